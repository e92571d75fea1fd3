"""Pictures of attention. Plotting libraries are imported inside the functions that need them.

The interactive HTML viewer (:func:`to_html`) needs no plotting library; it is re-exported here.
"""

from selfattention.viz.html import AttentionView, HeadData, ViewerHTML, to_html, view_from_capture

__all__ = ["AttentionView", "HeadData", "ViewerHTML", "to_html", "view_from_capture"]
