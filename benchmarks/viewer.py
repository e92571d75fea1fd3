"""How the attention viewer's page scales with the number of tokens, measured in headless Chromium.

    python benchmarks/viewer.py [--tokens 64 256 512] [--minilm 64 256] [--smollm2 1024] [--full] [--markdown FILE]

For each length: the page size, the time Python takes to build it, the time from opening the file to the
first drawing, and median milliseconds (in the page, ``performance.now``) from a change until the next
frame is painted: hovering a query token, switching heads, going back to the overview with nothing focused.
A frame takes about 17 ms at 60 frames per second, and the measurement waits for two, so ~33 ms is the floor. Needs the
``playwright`` package and Debian's ``/usr/bin/chromium`` (as the browser tests do).

Pages from a capture whose weights would take more than 16 MiB are compact (the top keys of each row, exact,
and the rest of the mass; ``selfattention.viz.html.PAGE_BUDGET``): ``--full`` adds the page with every weight
for each MiniLM length, and the size every weight would take for SmolLM2 (not built: over a gigabyte).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from functools import partial
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


def measure(browser: object, label: str, build: Callable[[], str], folder: Path) -> str:
    """One table row: build the page, open it, time hovers, head switches and overviews."""
    start = time.perf_counter()
    page_html = build()
    build_ms = (time.perf_counter() - start) * 1e3
    path = folder / "view.html"
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
    SIZES[label] = size
    return f"| {label} | {size:,.0f} | {build_ms:,.0f} | {load_ms:,.0f} | {hover:.1f} | {head:.1f} | {every:.1f} |"


SIZES: dict[str, float] = {}
"""KiB of each page measured, by label."""
COMMON = "the cat sat on a mat and the dog ran in the park by the old house".split()  # one word piece each


def words(count: int) -> str:
    """``count`` words, 97 different ones."""
    return " ".join(f"w{i % 97}" for i in range(count))


def common_words(count: int) -> str:
    """``count`` English words that MiniLM's tokenizer keeps whole."""
    return " ".join(COMMON[i % len(COMMON)] for i in range(count))


def minilm_page(model: object, count: int, *, full: bool) -> str:
    """A MiniLM page of ``count`` tokens (``count - 2`` words, [CLS], [SEP]), compact unless ``full``."""
    from selfattention import capture
    from selfattention.viz.html import view_from_capture

    with capture(model.encoder) as cap:  # type: ignore[attr-defined]
        encoded = model.encode([common_words(count - 2)])  # type: ignore[attr-defined]
    budget = 1 << 62 if full else None
    view = view_from_capture(cap, encoded.batch.tokens(0), **({"budget": budget} if budget else {}))
    return view.to_html()


def smollm2_text(count: int) -> str:
    """Words that SmolLM2's tokenizer reads as one token each (a space and a common word): ``count`` tokens."""
    return " ".join(COMMON[i % len(COMMON)] for i in range(count))


def smollm2_full_mib(count: int) -> float:
    """MiB of page data every weight of every head of SmolLM2 would take at ``count`` tokens (not built)."""
    from selfattention import capture
    from selfattention.loaders.gguf import load_smollm2
    from selfattention.viz.html import _full_bytes

    lm = load_smollm2()
    ids = lm.encode(smollm2_text(count))
    import torch

    with torch.no_grad(), capture(lm.model) as cap:
        lm.model(torch.tensor([ids]))
    return _full_bytes(list(cap.items())) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[64, 256, 512])
    parser.add_argument("--minilm", type=int, nargs="*", default=[], metavar="TOKENS", help="also MiniLM pages")
    parser.add_argument("--smollm2", type=int, nargs="*", default=[], metavar="TOKENS", help="also SmolLM2 pages")
    parser.add_argument("--full", action="store_true", help="also MiniLM pages with every weight")
    parser.add_argument("--markdown", help="also write the table to this Markdown file")
    args = parser.parse_args()
    cases: list[tuple[str, Callable[[], str]]] = [
        (f"example, {n} tokens", partial(lambda n: example_view(words(n)).to_html(), n)) for n in args.tokens
    ]
    if args.minilm:
        from selfattention.pretrained import load_minilm

        model = load_minilm()
        for n in args.minilm:  # n - 2 words, each one word piece, then [CLS] and [SEP]
            cases.append((f"MiniLM, {n} tokens", partial(lambda n: minilm_page(model, n, full=False), n)))
            if args.full:
                cases.append(
                    (f"MiniLM, {n} tokens, every weight", partial(lambda n: minilm_page(model, n, full=True), n))
                )
    notes = []
    for n in args.smollm2:
        from selfattention.viz.sources import gguf_view

        cases.append((f"SmolLM2, {n} tokens", partial(lambda n: gguf_view("smollm2", smollm2_text(n)).to_html(), n)))
        if args.full:
            notes.append(
                f"SmolLM2 at {n} tokens with every weight would carry {smollm2_full_mib(n):,.0f} MiB (not built)"
            )
    from playwright.sync_api import sync_playwright

    rows = [
        "| page | page KiB | build ms | open ms | hover ms | head switch ms | overview ms |",
        "|---|---|---|---|---|---|---|",
    ]
    with sync_playwright() as driver, tempfile.TemporaryDirectory() as folder:
        browser = driver.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        version = browser.version
        rows += [measure(browser, label, build, Path(folder)) for label, build in cases]
        browser.close()
    for n in args.minilm if args.full else []:
        full, compact = SIZES[f"MiniLM, {n} tokens, every weight"], SIZES[f"MiniLM, {n} tokens"]
        notes.append(f"MiniLM at {n} tokens: the compact page is {full / compact:.1f}x smaller than every weight")
    table = "\n".join(rows)
    print(f"Chromium {version}, headless, software rendering; example: 2 layers, 5 heads; MiniLM: 6 x 12 heads")
    print(f"ms until painted (2 frames, >= ~33 ms); medians of 21 hovers, 9 head switches, 5 overviews\n{table}")
    for note in notes:
        print(note)
    if args.markdown:
        from selfattention.files import write_text

        write_text(args.markdown, table + "\n" + "".join(f"\n{note}\n" for note in notes))


if __name__ == "__main__":
    main()
