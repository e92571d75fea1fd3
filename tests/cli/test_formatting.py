"""The shared printing of ``explain``: vectors, tables and the JSON fields of the four steps."""

from __future__ import annotations

import json

import torch

from selfattention import examples
from selfattention.cli.formatting import matrix, steps_document, vector
from selfattention.walkthrough import walk


def test_a_vector_is_printed_whole_or_cut_after_shown_numbers_with_its_length() -> None:
    values = torch.tensor([0.5, -1.25, 2.0, 3.0])
    assert vector(values) == "[0.5000, -1.2500, 2.0000, 3.0000]"
    assert vector(values, shown=2) == "[0.5000, -1.2500, ...] (4 numbers)"
    assert vector(values, shown=4) == vector(values)


def test_a_matrix_has_one_labelled_line_per_row_under_the_column_labels() -> None:
    lines = matrix(torch.tensor([[0.25, 0.75], [1.0, 0.0]]), ["a", "longer-word"], ["first", "second"])
    assert lines == [
        " " * 12 + "    first   second",
        "a           " + "   0.2500   0.7500",
        "longer-word " + "   1.0000   0.0000",
    ]


def test_the_steps_document_holds_the_walkthrough_tensors() -> None:
    result = walk(examples.TOKENS, examples.embeddings(), scaled=True, causal=True)
    document = json.loads(json.dumps(steps_document(result)))
    assert document["weights"] == result.weights.tolist()
    assert document["context"] == result.context.tolist()
    assert (document["scale"], document["causal"]) == (result.scale, result.causal)


def test_json_refuses_numbers_it_cannot_hold_and_keeps_those_beyond_float32() -> None:
    import math

    import pytest

    from selfattention.cli.options import json_text

    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match=r"^the result holds a non-finite number \((nan|inf|-inf)\), which JSON"):
            json_text({"heads": [[0.5, bad]]})
    assert json_text({"a": 1e39, "b": 0.4300000071525574}, indent=None) == '{"a": 1e+39, "b": 0.43}\n'
