"""The attention viewer in a real browser: Debian's Chromium driven headless by the playwright package.

No browser is downloaded: playwright starts ``/usr/bin/chromium`` (``SELFATTENTION_CHROMIUM`` overrides the
path) through ``executable_path``. Without it, or without playwright, these tests skip and say what to install;
``.ci/run`` installs Chromium and sets ``SELFATTENTION_REQUIRE_BROWSER=1``, which turns the skip into a failure.

Every page is opened from a ``file://`` URL in an offline browser context whose requests other than
``file:``/``data:`` are aborted and recorded; each test ends by asserting that none was attempted and that
the page raised no JavaScript error. Screenshots go to ``test-artifacts/`` (not committed).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from selfattention.examples import TOKENS
from selfattention.viz import to_html
from selfattention.viz.sources import example_view

CHROMIUM = os.environ.get("SELFATTENTION_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
LAUNCH_ARGS = [
    "--no-sandbox",  # CI runs as root, where Chromium's sandbox cannot start
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-default-apps",
    "--disable-domain-reliability",
    "--disable-sync",
    "--no-first-run",
    "--no-pings",
]
VIEWER_READY = "window.viewerState && window.viewerState.ready"
JOURNEY_WEIGHTS = ["0.1385", "0.2379", "0.2333", "0.1240", "0.1082", "0.1581"]
JOURNEY_SCORES = ["0.9544", "1.4950", "1.4754", "0.8434", "0.7070", "1.0865"]


def _missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is missing: make install-test (pip install -e '.[test]')"
    if not os.access(CHROMIUM, os.X_OK):
        return f"no Chromium at {CHROMIUM}: apt-get install -y chromium (Debian's package; .ci/run installs it)"
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    reason = _missing()
    if reason is not None:
        if os.environ.get("SELFATTENTION_REQUIRE_BROWSER") == "1":
            pytest.fail(f"browser tests are required here but cannot run: {reason}")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as driver:
        launched = driver.chromium.launch(executable_path=CHROMIUM, headless=True, args=LAUNCH_ARGS)
        yield launched
        launched.close()


class Viewer:
    """One offline page of the viewer, with the requests it attempted and the errors it raised."""

    def __init__(self, browser: Any, page_html: str, path: Path, ready: str = VIEWER_READY) -> None:
        path.write_text(page_html, encoding="utf-8")
        self.context = browser.new_context(offline=True, viewport={"width": 1280, "height": 900})
        self.blocked: list[str] = []
        self.errors: list[str] = []
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.goto(path.as_uri())
        self.page.wait_for_function(ready)

    def _route(self, route: Any) -> None:
        url = route.request.url
        if url.startswith(("file:", "data:")):
            route.continue_()
        else:
            self.blocked.append(url)
            route.abort()

    def state(self) -> dict[str, Any]:
        return self.page.evaluate("({...window.viewerState})")

    def weights(self) -> list[float]:
        return [line["weight"] for line in self.state()["lines"]]

    def widths(self) -> list[float]:
        return [line["width"] for line in self.state()["lines"]]

    def canvas_pixels(self) -> list[int]:
        """The line canvas's alpha channel, summed per 8-pixel band of rows (a cheap fingerprint)."""
        return self.page.evaluate(
            """() => {
                const c = document.getElementById("lines");
                const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
                const bands = new Array(Math.ceil(c.height / 8)).fill(0);
                for (let p = 3; p < d.length; p += 4) bands[Math.floor((p >> 2) / c.width / 8)] += d[p];
                return bands;
            }"""
        )

    def hover(self, side: str, index: int) -> None:
        self.page.locator(f"#{'queries' if side == 'query' else 'keys'} .tok[data-i='{index}']").hover()

    def close(self) -> None:
        self.context.close()
        assert self.blocked == [], f"the page tried to reach the network: {self.blocked}"
        assert self.errors == [], f"the page raised errors: {self.errors}"


@pytest.fixture
def open_viewer(browser: Any, tmp_path: Path) -> Iterator[Any]:
    opened: list[Viewer] = []

    def open_page(page_html: str, name: str = "view.html", ready: str = VIEWER_READY) -> Viewer:
        viewer = Viewer(browser, page_html, tmp_path / name, ready)
        opened.append(viewer)
        return viewer

    yield open_page
    for viewer in opened:
        viewer.close()


def _texts(viewer: Viewer, selector: str) -> list[str]:
    return viewer.page.locator(selector).all_inner_texts()


def test_tokens_render_and_lines_are_drawn(open_viewer: Any) -> None:
    viewer = open_viewer(example_view().to_html())
    assert _texts(viewer, "#queries .tok") == list(TOKENS)
    assert _texts(viewer, "#keys .tok") == list(TOKENS)
    for index in range(len(TOKENS)):
        assert viewer.page.locator(f"#queries .tok[data-i='{index}']").is_visible()
    state = viewer.state()
    assert (state["numTokens"], state["numLayers"], state["numHeads"], state["focus"]) == (6, 2, 1, None)
    assert state["drawnLines"] == 36  # every query to every key, before anything is focused
    assert sum(viewer.canvas_pixels()) > 0


def test_hovering_a_token_changes_the_highlighted_lines(open_viewer: Any) -> None:
    viewer = open_viewer(example_view().to_html())
    unfocused = viewer.canvas_pixels()
    viewer.hover("query", 1)
    state = viewer.state()
    assert (state["focus"], state["side"]) == (1, "query")
    assert [f"{w:.4f}" for w in viewer.weights()] == JOURNEY_WEIGHTS
    assert viewer.widths() == pytest.approx([12 * w for w in viewer.weights()])  # thickness = 12 px × α
    journey = viewer.canvas_pixels()
    assert journey != unfocused
    assert viewer.page.locator("#queries .tok.focus").inner_text() == "journey"

    viewer.hover("query", 4)
    assert viewer.state()["focus"] == 4
    assert [f"{w:.4f}" for w in viewer.weights()] != JOURNEY_WEIGHTS
    assert viewer.canvas_pixels() != journey

    viewer.page.locator("#queries .tok[data-i='2']").click()  # pinned: hovering elsewhere keeps it
    viewer.hover("query", 5)
    assert (viewer.state()["focus"], viewer.state()["pinned"]) == (2, 2)
    viewer.page.keyboard.press("ArrowDown")  # arrows move the focus, and the pin with it
    assert (viewer.state()["focus"], viewer.state()["pinned"]) == (3, 3)
    viewer.page.keyboard.press("Escape")  # back to the overview of every line
    assert (viewer.state()["focus"], viewer.state()["pinned"], viewer.state()["drawnLines"]) == (None, None, 36)
    assert viewer.canvas_pixels() == unfocused

    viewer.hover("key", 1)  # a key: the lines from every query into "journey"
    state = viewer.state()
    assert (state["focus"], state["side"]) == (1, "key")
    assert [line["key"] for line in state["lines"]] == [1] * 6
    assert [f"{w:.4f}" for w in viewer.weights()][1] == JOURNEY_WEIGHTS[1]


def test_journey_shows_the_worked_example_numbers(open_viewer: Any) -> None:
    viewer = open_viewer(example_view().to_html())
    viewer.hover("query", 1)
    assert viewer.page.locator("#query-title").inner_text() == 'Query 1 "journey"'
    assert _texts(viewer, "#steps td.alpha") == JOURNEY_WEIGHTS
    assert _texts(viewer, "#steps td.omega") == JOURNEY_SCORES
    assert viewer.page.locator("#alpha-sum").inner_text() == "1.0000"
    assert viewer.page.locator("#context").inner_text() == "z = [0.4419, 0.6515, 0.5683]"
    assert viewer.page.locator("#query-vector").inner_text() == "qi = [0.5500, 0.8700, 0.6600]"
    ARTIFACTS.mkdir(exist_ok=True)
    viewer.page.screenshot(path=str(ARTIFACTS / "viewer.png"))
    assert (ARTIFACTS / "viewer.png").stat().st_size > 10_000


def test_switching_heads_changes_the_lines(open_viewer: Any) -> None:
    view = example_view()
    viewer = open_viewer(view.to_html())
    viewer.page.select_option("#layer", "1")
    assert viewer.state()["numHeads"] == 4
    viewer.hover("query", 1)
    head0, pixels0 = viewer.weights(), viewer.canvas_pixels()
    assert head0 == pytest.approx(view.layers[1][0].weights[1], abs=1e-6)
    viewer.page.select_option("#head", "2")
    state = viewer.state()
    assert (state["layer"], state["head"], state["focus"]) == (1, 2, 1)
    assert viewer.weights() == pytest.approx(view.layers[1][2].weights[1], abs=1e-6)
    assert viewer.weights() != pytest.approx(head0, abs=1e-3)
    assert viewer.canvas_pixels() != pixels0
    viewer.page.locator(".thumb[data-layer='1'][data-head='3']").click()
    assert (viewer.state()["layer"], viewer.state()["head"]) == (1, 3)
    assert viewer.page.locator(".thumb.selected").get_attribute("data-head") == "3"
    assert viewer.page.locator(".thumb").count() == 5


def test_a_causal_model_shows_its_mask(open_viewer: Any) -> None:
    viewer = open_viewer(example_view(causal=True).to_html())
    assert viewer.page.locator("#mask-badge").is_visible()
    viewer.hover("query", 1)
    assert _texts(viewer, "#steps td.alpha")[2:] == ["0 (masked)"] * 4
    assert _texts(viewer, "#keys .tok.masked") == list(TOKENS[2:])
    assert viewer.widths()[2:] == [0.0] * 4
    assert sum(viewer.weights()) == pytest.approx(1.0, abs=1e-6)


def test_256_tokens(open_viewer: Any) -> None:
    words = " ".join(f"w{i % 50}" for i in range(256))
    view = example_view(words)
    viewer = open_viewer(view.to_html(), "long.html")
    assert viewer.page.locator("#queries .tok").count() == 256
    assert viewer.state()["drawnLines"] > 0
    viewer.hover("query", 200)  # scrolls it into view first
    state = viewer.state()
    assert state["focus"] == 200
    assert viewer.weights() == pytest.approx(view.layers[0][0].weights[200], abs=1e-6)
    row = view.layers[0][0].weights[200]
    largest = sorted(sorted(range(256), key=lambda j: -row[j])[:64])
    shown = [int(j) for j in viewer.page.locator("#steps tbody tr").evaluate_all("rows => rows.map(r => r.dataset.j)")]
    assert shown == largest  # the 64 largest weights, in key order
    assert viewer.page.locator("#alpha-sum").inner_text() == "1.0000"  # the sum is over all 256
    viewer.page.locator("#all-rows").click()
    assert viewer.page.locator("#steps tbody tr").count() == 256


def test_a_capture_of_a_causal_model_with_grouped_heads(open_viewer: Any) -> None:
    from selfattention import MultiHeadAttention, capture

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        MultiHeadAttention(8, 8, 16, 0.0, num_heads=4, num_kv_heads=2),
        MultiHeadAttention(8, 8, 16, 0.0, num_heads=4, num_kv_heads=2),
    ).eval()
    tokens = ["a", "b", "</script>", "<b>d</b>", "e"]
    with capture(model) as cap, torch.no_grad():
        model(torch.randn(1, 5, 8))
    viewer = open_viewer(to_html(cap, tokens))
    assert _texts(viewer, "#queries .tok") == tokens
    assert viewer.state()["causal"] is True
    viewer.page.locator(".thumb[data-layer='1'][data-head='3']").click()
    viewer.hover("query", 3)
    assert viewer.weights() == pytest.approx(cap["1"].weights[0, 3, 3].tolist(), abs=1e-6)
    shown = [float(text) for text in _texts(viewer, "#steps td.alpha")[:4]]
    assert shown == pytest.approx(cap["1"].weights[0, 3, 3, :4].tolist(), abs=5e-5)  # 4 decimals shown


def test_the_harness_catches_a_page_that_reaches_for_the_network(browser: Any, tmp_path: Path) -> None:
    """The no-network assertion above can fail: a page that loads an image from a host is caught."""
    viewer = Viewer(
        browser,
        '<!DOCTYPE html><img src="http://192.0.2.1/x.png"><script>window.viewerState={ready:1}</script>',
        tmp_path / "x.html",
    )
    viewer.page.wait_for_load_state("load")
    viewer.context.close()
    assert viewer.blocked == ["http://192.0.2.1/x.png"]


def test_the_pretrained_encoder_in_the_browser(open_viewer: Any, minilm: Any) -> None:
    from selfattention.viz.sources import pretrained_view

    view = pretrained_view(minilm, "The bat flew out of the cave.")
    viewer = open_viewer(view.to_html(), "minilm.html")
    assert viewer.page.locator(".thumb").count() == 72 + 1  # 6 layers of 12 heads, and the rollout
    assert _texts(viewer, "#keys .tok")[0] == "[CLS]"
    viewer.page.select_option("#layer", "2")
    viewer.hover("query", 2)
    before = viewer.weights()
    assert before == pytest.approx(view.layers[2][0].weights[2], abs=1e-6)
    viewer.page.select_option("#head", "5")
    assert viewer.weights() == pytest.approx(view.layers[2][5].weights[2], abs=1e-6)
    shown = [float(text) for text in _texts(viewer, "#steps td.omega")]  # ω = q · k, computed in the page
    assert shown == pytest.approx(view.layers[2][5].scores[2], abs=1e-4)  # 4 decimals, float32 q and k
    assert viewer.weights() != pytest.approx(before, abs=1e-3)
    ARTIFACTS.mkdir(exist_ok=True)
    viewer.page.screenshot(path=str(ARTIFACTS / "viewer-minilm.png"), full_page=True)


def test_the_notebook_frame_runs_the_viewer(open_viewer: Any) -> None:
    """What a notebook displays (``_repr_html_``, an iframe with the page in srcdoc) shows the same view."""
    frame_html = example_view()._repr_html_()
    page_html = f"<!DOCTYPE html><html><body>{frame_html}</body></html>"
    viewer = open_viewer(page_html, "notebook.html", "document.readyState === 'complete'")
    frame = viewer.page.frame_locator("iframe")
    assert frame.locator("#queries .tok").all_inner_texts() == list(TOKENS)
    frame.locator("#queries .tok[data-i='1']").hover()
    assert frame.locator("#context").inner_text() == "z = [0.4419, 0.6515, 0.5683]"


def test_a_compact_page_shows_the_exact_top_keys_and_the_rest(open_viewer: Any) -> None:
    from selfattention import MultiHeadAttention, capture

    torch.manual_seed(0)
    model = torch.nn.Sequential(*(MultiHeadAttention(8, 8, 64, 0.0, num_heads=4, num_kv_heads=2) for _ in range(2)))
    tokens = [f"t{i}" for i in range(40)]
    with capture(model.eval()) as cap, torch.no_grad():
        model(torch.randn(1, 40, 8))
    viewer = open_viewer(to_html(cap, tokens, top_k=4), "compact.html")
    assert viewer.state()["compact"] is True
    viewer.page.locator(".thumb[data-layer='1'][data-head='3']").click()
    viewer.hover("query", 30)
    record = cap["1"]
    values, indices, rest = record.top_k(4, heads=3, rows=30)
    order = indices[0, 0, 0].argsort()  # the panel lists keys in order
    shown_keys = [
        int(j) for j in viewer.page.locator("#steps tbody tr[data-j]").evaluate_all("r => r.map(x => x.dataset.j)")
    ]
    assert shown_keys == indices[0, 0, 0][order].tolist()
    alphas = [float(text) for text in _texts(viewer, "#steps tbody tr[data-j] td.alpha")]
    assert alphas == pytest.approx(values[0, 0, 0][order].tolist(), abs=5e-5)  # 4 decimals shown
    omegas = [float(text) for text in _texts(viewer, "#steps tbody tr[data-j] td.omega")]
    scores = record.scores_for(heads=3, rows=30)[0, 0, 0]
    assert omegas == pytest.approx(scores[indices[0, 0, 0][order]].tolist(), abs=5e-4)
    assert float(viewer.page.locator("#rest-mass").inner_text()) == pytest.approx(float(rest[0, 0, 0]), abs=5e-5)
    assert viewer.page.locator("#alpha-sum").inner_text() == "1.0000"
    assert viewer.weights() == pytest.approx(
        record.weights[0, 3, 30].where(record.weights[0, 3, 30] >= values[0, 0, 0, -1], 0).tolist(), abs=1e-6
    )


def test_the_rollout_view_shows_the_whole_models_rollout(open_viewer: Any) -> None:
    from selfattention import MultiHeadAttention, capture
    from selfattention.rollout import attention_rollout

    torch.manual_seed(0)
    model = torch.nn.Sequential(*(MultiHeadAttention(8, 8, 16, 0.0, num_heads=4, causal=True) for _ in range(3)))
    tokens = [f"t{i}" for i in range(10)]
    with capture(model.eval()) as cap, torch.no_grad():
        model(torch.randn(1, 10, 8))
    rollout = attention_rollout([record.weights[0] for _, record in cap.items()])[-1]  # (T, T)
    viewer = open_viewer(to_html(cap, tokens), "rollout.html")
    viewer.page.select_option("#layer", label="rollout (whole model)")
    state = viewer.state()
    assert state["rollout"] is True and state["numHeads"] == 1
    viewer.hover("query", 7)
    assert viewer.weights() == pytest.approx(rollout[7].tolist(), abs=1e-6)  # the lines: row 7 of R
    cell = viewer.page.locator("#steps tr[data-j='2'] td.rollout").inner_text()
    assert float(cell) == pytest.approx(float(rollout[7, 2]), abs=5e-5)  # 4 decimals shown
    assert viewer.page.locator("#rollout-sum").inner_text() == "1.0000"
    assert viewer.page.locator("#steps td.omega").count() == 0  # rollout has no q · k
    assert "Abnar" in viewer.page.locator("#rollout-note").inner_text()
    viewer.page.locator(".thumb[data-layer='1'][data-head='2']").click()  # back to one head
    assert viewer.state()["rollout"] is False
    assert viewer.weights() == pytest.approx(cap["1"].weights[0, 2, 7].tolist(), abs=1e-6)
    viewer.page.locator("#rollout-thumb").click()
    assert viewer.state()["rollout"] is True
