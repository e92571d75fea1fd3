"""Pictures of attention: the interactive HTML viewer (:func:`to_html`)."""

from selfattention.viz.html import AttentionView, HeadData, ViewerHTML, to_html, view_from_capture

__all__ = ["AttentionView", "HeadData", "ViewerHTML", "to_html", "view_from_capture"]
