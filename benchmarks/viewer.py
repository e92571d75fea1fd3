"""How the attention viewer's page scales with the number of tokens, measured in headless Chromium.

    python benchmarks/viewer.py [--tokens 64 256 512] [--markdown FILE]

For each length: the page size, the time Python takes to build it, the time from opening the file to the
first drawing, and median milliseconds (in the page, ``performance.now``) from a change until the next
frame is painted: hovering a query token, switching heads, going back to the overview with nothing focused.
A frame takes about 17 ms at 60 frames per second, and the measurement waits for two, so ~33 ms is the floor. Needs the
``playwright`` package and Debian's ``/usr/bin/chromium`` (as the browser tests do).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from selfattention.viz.sources import example_view

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking"]
TIMED = """async ([kind, count]) => {
    // From the change until the next frame has been painted (two animation frames), as a user sees it.
    const T = window.viewerState.numTokens, samples = [];
    const painted = () => new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)));
    await painted();
    for (let n = 0; n < count; n++) {
        const start = performance.now();
        if (kind === "hover") window.viewerFocus((n * 37) % T, "query");
        else if (kind === "head") window.viewerSelect(1, n % 4);
        else window.viewerFocus(null, "query");
        await painted();
        samples.push(performance.now() - start);
        if (kind === "all") { window.viewerFocus(0, "query"); await painted(); }
    }
    samples.sort((a, b) => a - b);
    return samples[Math.floor(samples.length / 2)];
}"""


def measure(browser: object, tokens: int, folder: Path) -> str:
    """One table row for a page of ``tokens`` words."""
    start = time.perf_counter()
    page_html = example_view(" ".join(f"w{i % 97}" for i in range(tokens))).to_html()
    build_ms = (time.perf_counter() - start) * 1e3
    path = folder / f"view-{tokens}.html"
    path.write_text(page_html, encoding="utf-8")
    page = browser.new_page(viewport={"width": 1280, "height": 900})  # type: ignore[attr-defined]
    start = time.perf_counter()
    page.goto(path.as_uri())
    page.wait_for_function("window.viewerState && window.viewerState.ready")
    load_ms = (time.perf_counter() - start) * 1e3
    hover = page.evaluate(TIMED, ["hover", 21])
    head = page.evaluate(TIMED, ["head", 9])
    every = page.evaluate(TIMED, ["all", 5])
    page.close()
    size = len(page_html.encode("utf-8")) / 1024
    return f"| {tokens} | {size:,.0f} | {build_ms:,.0f} | {load_ms:,.0f} | {hover:.1f} | {head:.1f} | {every:.1f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[64, 256, 512])
    parser.add_argument("--markdown", help="also write the table to this Markdown file")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    rows = [
        "| tokens | page KiB | build ms | open ms | hover ms | head switch ms | overview ms |",
        "|---|---|---|---|---|---|---|",
    ]
    with sync_playwright() as driver, tempfile.TemporaryDirectory() as folder:
        browser = driver.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        version = browser.version
        rows += [measure(browser, tokens, Path(folder)) for tokens in args.tokens]
        browser.close()
    table = "\n".join(rows)
    print(f"Chromium {version}, headless, software rendering; example model: 2 layers, 5 heads")
    print(f"ms until painted (2 frames, >= ~33 ms); medians of 21 hovers, 9 head switches, 5 overviews\n{table}")
    if args.markdown:
        from selfattention.files import write_text

        write_text(args.markdown, table + "\n")


if __name__ == "__main__":
    main()
