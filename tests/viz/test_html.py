"""The viewer page built from Python: its data, its checks and its template (no browser needed)."""

from __future__ import annotations

import doctest
import html
import re
import tomllib
from fnmatch import fnmatch
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import torch

import selfattention.viz.html
from selfattention import MultiHeadAttention, capture
from selfattention.examples import TOKENS
from selfattention.viz import AttentionView, HeadData, to_html, view_from_capture
from selfattention.viz.sources import embed_words, example_view
from selfattention.walkthrough import walk
from viewer_pages import decode, page_data, tiny_head

ROOT = Path(__file__).resolve().parents[2]


def test_the_example_view_carries_the_worked_example() -> None:
    view = example_view()
    journey = view.layers[0][0]
    torch.testing.assert_close(
        torch.tensor(journey.weights[1]),
        torch.tensor([0.1385, 0.2379, 0.2333, 0.1240, 0.1082, 0.1581]),
        atol=5e-5,
        rtol=0,
    )
    torch.testing.assert_close(
        torch.tensor(journey.context[1]), torch.tensor([0.4419, 0.6515, 0.5683]), atol=5e-5, rtol=0
    )
    assert view.tokens == list(TOKENS)
    assert [len(heads) for heads in view.layers] == [1, 4]
    assert view.scales == pytest.approx([1.0, 2**-0.5])


def test_each_random_head_is_attention_on_its_projection() -> None:
    """Layer 1 head h equals the walk-through run with head h's slice of the seeded projections."""
    view = example_view(num_heads=3, causal=True)
    x = embed_words(list(TOKENS))
    torch.manual_seed(123)
    w_query, w_key, w_value = (torch.rand(3, 6) for _ in range(3))
    for h, head in enumerate(view.layers[1]):
        part = slice(2 * h, 2 * h + 2)
        steps = walk(
            TOKENS, x, projections=(w_query[:, part], w_key[:, part], w_value[:, part]), scaled=True, causal=True
        )
        torch.testing.assert_close(torch.tensor(head.weights), steps.weights)
        torch.testing.assert_close(torch.tensor(head.context), steps.context)
        torch.testing.assert_close(torch.tensor(head.scores), steps.scores)


def test_unknown_words_get_a_fixed_embedding() -> None:
    first, second = embed_words(["Journey", "zebra", "zebra"]), embed_words(["zebra"])
    torch.testing.assert_close(first[0], torch.tensor([0.55, 0.87, 0.66]))
    torch.testing.assert_close(first[1], first[2])
    torch.testing.assert_close(first[1], second[0])
    assert ((first[1] >= 0) & (first[1] < 1)).all()


def test_the_page_holds_every_matrix_in_float32() -> None:
    view = example_view()
    data = page_data(view.to_html())
    assert data["tokens"] == list(TOKENS)
    assert [layer["scale"] for layer in data["layers"]] == pytest.approx([1.0, 2**-0.5])
    for layer, heads in zip(data["layers"], view.layers, strict=True):
        for encoded, head in zip(layer["heads"], heads, strict=True):
            assert "scores" not in encoded  # the page computes ω = q · k itself
            for key, name in [
                ("q", "query"),
                ("k", "key"),
                ("v", "value"),
                ("weights", "weights"),
                ("context", "context"),
            ]:
                expected = torch.tensor(getattr(head, name), dtype=torch.float32)
                torch.testing.assert_close(decode(encoded[key]), expected, atol=0, rtol=0)


def test_the_page_is_self_contained() -> None:
    page = example_view().to_html()
    assert page.startswith("<!DOCTYPE html>")
    assert "http://" not in page and "https://" not in page and "//cdn" not in page
    assert not re.search(r"<(script|link|img|iframe)[^>]*\s(src|href)=", page)
    assert "@VIEWER_" not in page
    assert "default-src 'none'" in page  # the page may not load anything, even if a token asks for it


def test_tokens_cannot_break_out_of_the_data_block() -> None:
    tokens = ["</script><script>alert(1)</script>", "<!--", "@VIEWER_DATA@"]
    view = AttentionView(tokens, [[HeadData.from_lists(**tiny_head(3))]], title="</title>x")
    page = to_html(view)
    assert page.count("</script>") == 2  # the end of the data block and the end of the code
    assert page_data(page)["tokens"] == tokens
    assert "<title>&lt;/title&gt;x</title>" in page


def test_notebooks_get_an_isolated_frame() -> None:
    page = example_view().to_html()
    frame = page._repr_html_()
    assert frame.startswith("<iframe srcdoc=")
    assert html.unescape(frame.split('srcdoc="', 1)[1].split('" style=', 1)[0]) == page
    assert example_view()._repr_html_() == frame


def test_to_html_from_a_capture() -> None:
    torch.manual_seed(1)
    model = torch.nn.Sequential(
        MultiHeadAttention(8, 8, 16, 0.0, num_heads=4, num_kv_heads=2, causal=False),
        MultiHeadAttention(8, 8, 16, 0.0, num_heads=2),
    ).eval()
    with capture(model) as cap, torch.no_grad():
        model(torch.randn(2, 5, 8))
    view = view_from_capture(cap, list("abcde"), batch=1)
    assert view.layer_names == ["0", "1"] and [len(h) for h in view.layers] == [4, 2]
    assert view.causal  # the second module is causal
    assert view.scales == pytest.approx([2**-0.5, 0.5])  # 1/sqrt(D): heads of width 2, then 4
    for layer, name in enumerate(["0", "1"]):
        for h, head in enumerate(view.layers[layer]):
            torch.testing.assert_close(torch.tensor(head.weights), cap[name].weights[1, h])
            torch.testing.assert_close(torch.tensor(head.context), cap[name].context[1, h])
            torch.testing.assert_close(torch.tensor(head.key), cap[name].head(h).key[1])
    torch.testing.assert_close(torch.tensor(view.layers[0][1].value), torch.tensor(view.layers[0][0].value))  # GQA
    assert page_data(to_html(cap, "abcde"))["causal"] is True
    record_view = page_data(to_html(cap["1"], list("abcde")))
    assert len(record_view["layers"]) == 1 and len(record_view["layers"][0]["heads"]) == 2


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda cap: to_html(cap, list("abcd")), ValueError, r"weights of shape \(5, 5\) per head, but 4 tokens"),
        (lambda cap: to_html(cap), ValueError, "needs the tokens"),
        (lambda cap: to_html(cap, list("abcde"), batch=2), ValueError, "batch 2 out of range"),
        (lambda cap: to_html(42, ["a"]), TypeError, "not int"),
    ],
)
def test_bad_captures_are_named(call: Any, error: type[Exception], message: str) -> None:
    model = MultiHeadAttention(4, 4, 8, 0.0, num_heads=2)
    with capture(model) as cap, torch.no_grad():
        model(torch.randn(2, 5, 4))
    with pytest.raises(error, match=message):
        call(cap)


def test_an_empty_capture_is_named() -> None:
    model = MultiHeadAttention(4, 4, 8, 0.0, num_heads=2)
    with capture(model) as cap, pytest.raises(ValueError, match="recorded nothing"):
        to_html(cap, ["a"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"weights": [[1.0, 0.0]]}, r"weights has shape \(1, 2\) but query has shape \(2, 2\)"),
        ({"key": [[1.0], [0.0]]}, r"key has shape \(2, 1\)"),
        ({"context": [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]}, r"context \(2, 3\) must both be \(2, E\)"),
        ({"scores": [[1.0, 0.0], [0.0]]}, r"scores is ragged"),
        ({"weights": [[1.0, float("nan")], [0.0, 1.0]]}, r"weights\[0\]\[1\] is nan"),
    ],
)
def test_head_shapes_are_checked(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        HeadData.from_lists(**{**tiny_head(), **change})


def test_view_checks_are_named() -> None:
    head = HeadData.from_lists(**tiny_head())
    with pytest.raises(ValueError, match="layer 0 head 0 has 2 queries but there are 3 tokens"):
        AttentionView(["a", "b", "c"], [[head]])
    with pytest.raises(ValueError, match=r"heads per layer: \[1, 0\]"):
        AttentionView(["a", "b"], [[head], []])
    with pytest.raises(ValueError, match="1 layer_names given for 2 layers"):
        AttentionView(["a", "b"], [[head], [head]], layer_names=["x"])
    with pytest.raises(ValueError, match="at least one token"):
        AttentionView([], [[head]])


def test_the_template_ships_with_the_package() -> None:
    """The three template files are package data (a wheel built from pyproject.toml carries them)."""
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    folder = resources.files("selfattention.viz")
    for name in ("viewer.html", "viewer.css", "viewer.js"):
        assert (folder / name).is_file()
        assert any(fnmatch(name, pattern) for pattern in package_data["selfattention.viz"])


def test_the_docstring_example_runs() -> None:
    result = doctest.testmod(selfattention.viz.html)
    assert result.attempted > 0 and result.failed == 0
