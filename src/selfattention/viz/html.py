"""The attention viewer: one self-contained HTML page (scripts, styles and data inline, nothing fetched).

The page is built from a small, explicit structure, :class:`AttentionView`: the tokens, and for each layer
(an attention module) a list of heads, each a :class:`HeadData` holding what that head computed as nested
lists of floats: ``query (T, D)``, ``key (T, D)``, ``value (T, E)``, scores ``ω (T, T)``, weights
``α (T, T)`` and context ``z (T, E)`` (the shape notation of :mod:`selfattention.functional`). The viewer
shows self-attention, so the keys are the same tokens as the queries (``S == T``).

:func:`to_html` turns a view, or what :func:`selfattention.capture` recorded, into the page.

>>> view = AttentionView(["a", "b"], [[HeadData.from_lists(
...     query=[[1.0], [0.0]], key=[[1.0], [0.0]], value=[[1.0], [2.0]],
...     scores=[[1.0, 0.0], [0.0, 0.0]], weights=[[0.5, 0.5], [0.5, 0.5]], context=[[1.5], [1.5]])]])
>>> page = to_html(view)
>>> page.startswith("<!DOCTYPE html>"), "://" in page
(True, False)
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import sys
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

VISIBLE = {" ": "␣", "\n": "⏎", "\t": "⇥", "\r": "␍", "\u00a0": "⍽"}
"""How token labels show whitespace, on every page and in the command line's tables (space, newline, tab,
carriage return, no-break space); any other whitespace character is shown by its code point."""


def token_labels(pieces: Sequence[str]) -> list[str]:
    """Printable labels of token pieces: whitespace made visible (:data:`VISIBLE`), an empty piece as ``∅``.

    >>> token_labels([" the", "\\n", "", "\\u00a0a", "\\u2009"])
    ['␣the', '⏎', '∅', '⍽a', '⟨U+2009⟩']
    """
    return ["".join(_visible(c) for c in piece) or "∅" for piece in pieces]


def piece_labels(decode: Callable[[list[int]], str], ids: Iterable[Any]) -> list[str]:
    """:func:`token_labels` of each id decoded alone (``decode([id])``), as the tables and pages show tokens."""
    return token_labels([decode([int(i)]) for i in ids])


def _visible(character: str) -> str:
    if character in VISIBLE:
        return VISIBLE[character]
    return f"⟨U+{ord(character):04X}⟩" if character.isspace() else character


Matrix = list[list[float]]

_TEMPLATE_FILES = ("viewer.html", "viewer.css", "viewer.js")


def _matrix(name: str, rows: Sequence[Sequence[float]]) -> Matrix:
    """``rows`` as a rectangular list of lists of finite floats, or a ValueError naming ``name``."""
    matrix = [list(map(float, row)) for row in rows]
    widths = {len(row) for row in matrix}
    if len(widths) > 1:
        raise ValueError(f"{name} is ragged: its rows have widths {sorted(widths)}")
    for i, row in enumerate(matrix):
        if not all(map(math.isfinite, row)):
            j = next(j for j, x in enumerate(row) if not math.isfinite(x))
            raise ValueError(f"{name}[{i}][{j}] is {row[j]}; the viewer needs finite numbers")
    return matrix


def _shape(matrix: Matrix) -> tuple[int, int]:
    return len(matrix), len(matrix[0]) if matrix else 0


@dataclass(frozen=True)
class HeadData:
    """What one attention head computed for one sequence, as nested lists of floats.

    Attributes:
        query: q, ``(T, D)``.
        key: k, ``(T, D)``.
        value: v, ``(T, E)``.
        scores: ω = q kᵀ, ``(T, T)``, before scaling and masking (the page recomputes it from q and k).
        weights: α, ``(T, T)``; row ``i`` is how query ``i`` spreads its attention over the keys.
        context: z = α v, ``(T, E)``.
    """

    query: Matrix
    key: Matrix
    value: Matrix
    scores: Matrix
    weights: Matrix
    context: Matrix

    @classmethod
    def from_lists(
        cls,
        *,
        query: Sequence[Sequence[float]],
        key: Sequence[Sequence[float]],
        value: Sequence[Sequence[float]],
        scores: Sequence[Sequence[float]],
        weights: Sequence[Sequence[float]],
        context: Sequence[Sequence[float]],
    ) -> HeadData:
        """A head from any nested sequences of numbers, checked for shape and finiteness.

        Raises:
            ValueError: naming the matrix whose shape disagrees with the others, or a non-finite entry.
        """
        head = cls(
            query=_matrix("query", query),
            key=_matrix("key", key),
            value=_matrix("value", value),
            scores=_matrix("scores", scores),
            weights=_matrix("weights", weights),
            context=_matrix("context", context),
        )
        head.check()
        return head

    @classmethod
    def from_tensors(cls, query: Any, key: Any, value: Any, scores: Any, weights: Any, context: Any) -> HeadData:
        """A head from 2-D tensors (any dtype or device); they are copied to float lists."""
        matrices = {}
        for name, tensor in zip(
            ("query", "key", "value", "scores", "weights", "context"),
            (query, key, value, scores, weights, context),
            strict=True,
        ):
            if tensor.dim() != 2:
                raise ValueError(f"{name} must be 2-D (rows, columns), got shape {tuple(tensor.shape)}")
            matrices[name] = tensor.detach().float().cpu().tolist()
        return cls.from_lists(**matrices)

    @property
    def num_tokens(self) -> int:
        """``T``."""
        return len(self.weights)

    def check(self) -> None:
        """Raise ValueError, naming the shapes, unless q, k, v, ω, α and z agree with each other."""
        t, d = _shape(self.query)
        shapes = {name: _shape(getattr(self, name)) for name in ("key", "value", "scores", "weights", "context")}
        expected = {"key": (t, d), "scores": (t, t), "weights": (t, t)}
        for name, shape in expected.items():
            if shapes[name] != shape:
                raise ValueError(
                    f"{name} has shape {shapes[name]} but query has shape {(t, d)}, so {name} must be {shape}"
                )
        if shapes["value"][0] != t or shapes["context"] != shapes["value"]:
            raise ValueError(
                f"value {shapes['value']} and context {shapes['context']} must both be ({t}, E) "
                f"for query shape {(t, d)}"
            )


@dataclass(frozen=True)
class TopKHead:
    """One head of a compact page: the ``K`` largest weights of each row, exact, and the rest of the mass.

    A long page cannot carry every weight (``T × T`` per head) nor every vector; this carries, per query
    row, the kept keys' weights and indices, the mass of the others and the row's log-sum-exp, from which
    the page computes the scores of the kept keys, ``ω_ij = (ln α_ij + lse_i) / scale``.

    Attributes:
        weights: ``(T, K)`` in descending order per row. indices: ``(T, K)`` key indices of those weights.
        rest: ``(T,)``, ``1 - Σ weights`` of each row (0 for a row with no key). lse: ``(T,)``.
    """

    weights: Any
    indices: Any
    rest: Any
    lse: Any

    @property
    def num_tokens(self) -> int:
        """``T``."""
        return int(self.weights.shape[0])

    def payload(self) -> dict[str, Any]:
        """The head's part of the page's data."""
        indices = self.indices.detach().cpu().numpy()
        wide = int(indices.max(initial=0)) > 0xFFFF
        return {
            "topk": {
                "k": int(self.weights.shape[1]),
                "w": _encode_array(self.weights),
                ("j32" if wide else "j"): _b64(indices.astype("<u4" if wide else "<u2")),
                "rest": _encode_array(self.rest.reshape(-1, 1)),
                "lse": _encode_array(self.lse.reshape(-1, 1)),
            }
        }


@dataclass(frozen=True)
class AttentionView:
    """Everything the page shows: tokens, and per layer a list of heads.

    Attributes:
        tokens: the ``T`` token strings (both sides of the line view).
        layers: ``layers[l][h]`` is head ``h`` of layer ``l``; layers may have different head counts. A head
            is a :class:`HeadData` (everything) or a :class:`TopKHead` (a compact page's top keys per row).
        causal: whether the model masks future tokens (the page draws the mask).
        layer_names: one name per layer (default ``"layer 0"``, ...).
        scales: the number each layer's scores were multiplied by before the softmax (default 1).
        title: shown at the top of the page.
        rollout: the whole model's attention rollout ``(T, T)`` (:func:`selfattention.rollout.attention_rollout`
            after the last layer), shown as one more view; ``None`` for none.
    """

    tokens: list[str]
    layers: Sequence[Sequence[HeadData | TopKHead]]
    causal: bool = False
    layer_names: list[str] = field(default_factory=list)
    scales: list[float] = field(default_factory=list)
    title: str = "Attention"
    rollout: Matrix | None = None

    def __post_init__(self) -> None:
        if not self.tokens:
            raise ValueError("the view needs at least one token")
        if not self.layers or any(not heads for heads in self.layers):
            counts = [len(heads) for heads in self.layers]
            raise ValueError(f"every layer needs at least one head; heads per layer: {counts}")
        for name, values in (("layer_names", self.layer_names), ("scales", self.scales)):
            if values and len(values) != len(self.layers):
                raise ValueError(f"{len(values)} {name} given for {len(self.layers)} layers")
        for layer, heads in enumerate(self.layers):
            for index, head in enumerate(heads):
                if head.num_tokens != len(self.tokens):
                    raise ValueError(
                        f"layer {layer} head {index} has {head.num_tokens} queries "
                        f"but there are {len(self.tokens)} tokens"
                    )
        if self.rollout is not None:
            shape = _shape(_matrix("rollout", self.rollout))
            if shape != (len(self.tokens), len(self.tokens)):
                raise ValueError(f"rollout has shape {shape} but {len(self.tokens)} tokens need a square of that size")

    def to_html(self) -> ViewerHTML:
        """The page for this view (see :func:`to_html`)."""
        return ViewerHTML(_render(self))

    def _repr_html_(self) -> str:
        return self.to_html()._repr_html_()


class ViewerHTML(str):
    """The page as a string; notebooks display it (in an isolated iframe) through ``_repr_html_``."""

    def _repr_html_(self) -> str:
        srcdoc = html.escape(str(self), quote=True)
        return (
            f'<iframe srcdoc="{srcdoc}" style="width:100%;height:820px;border:1px solid #ddd" '
            'sandbox="allow-scripts"></iframe>'
        )


def _encode(matrix: Matrix) -> dict[str, Any]:
    """A matrix as ``{"shape": [rows, cols], "f32": base64 of little-endian float32}`` for the page."""
    rows, cols = _shape(matrix)
    flat = array("f")
    for row in matrix:
        flat.extend(row)
    if sys.byteorder != "little":
        flat.byteswap()
    return {"shape": [rows, cols], "f32": base64.b64encode(flat.tobytes()).decode("ascii")}


def _b64(array: Any) -> str:
    return base64.b64encode(array.tobytes()).decode("ascii")


def _encode_array(tensor: Any) -> dict[str, Any]:
    """A 2-D tensor as :func:`_encode` writes a matrix, without going through Python lists."""
    values = tensor.detach().float().cpu().numpy().astype("<f4")
    return {"shape": list(values.shape), "f32": _b64(values)}


def _head_payload(head: HeadData | TopKHead) -> dict[str, Any]:
    if isinstance(head, TopKHead):
        return head.payload()
    return {
        "q": _encode(head.query),
        "k": _encode(head.key),
        "v": _encode(head.value),
        "weights": _encode(head.weights),
        "context": _encode(head.context),
    }


def _payload(view: AttentionView) -> dict[str, Any]:
    """The page's data. Scores are left out: the page computes ω_ij = q_i · k_j (in float64 from the float32
    q and k) for the focused token, which halves the size of long pages (ω and α are the T × T parts)."""
    names = view.layer_names or [f"layer {i}" for i in range(len(view.layers))]
    scales = view.scales or [1.0] * len(view.layers)
    payload: dict[str, Any] = {
        "title": view.title,
        "tokens": list(view.tokens),
        "causal": view.causal,
        "layers": [
            {
                "name": name,
                "scale": scale,
                "heads": [_head_payload(head) for head in heads],
            }
            for name, scale, heads in zip(names, scales, view.layers, strict=True)
        ],
    }
    if view.rollout is not None:
        payload["rollout"] = _encode(view.rollout)
    return payload


def _template() -> dict[str, str]:
    folder = resources.files("selfattention.viz")
    return {name: (folder / name).read_text(encoding="utf-8") for name in _TEMPLATE_FILES}


_MARKER = re.compile(r"/\*@VIEWER_(CSS|JS)@\*/|@VIEWER_(DATA|TITLE)@")


def _render(view: AttentionView) -> str:
    parts = _template()
    # JSON inside <script>: escape "<" so no "</script>" or "<!--" in a token can end the block early.
    data = json.dumps(_payload(view), separators=(",", ":"), ensure_ascii=False).replace("<", "\\u003c")
    fills = {
        "CSS": parts["viewer.css"],
        "JS": parts["viewer.js"],
        "DATA": data,
        "TITLE": html.escape(view.title),
    }
    # One pass, so nothing inserted (a token, the title) is searched for markers again.
    return _MARKER.sub(lambda match: fills[match.group(1) or match.group(2)], parts["viewer.html"])


def _records(source: Any) -> list[tuple[str, Any]]:
    """``(name, record)`` pairs from a capture (``.items()``), a mapping, or one record."""
    if hasattr(source, "head") and hasattr(source, "weights"):
        return [("attention", source)]
    items = source.items() if hasattr(source, "items") else None
    if items is None:
        raise TypeError(
            f"to_html takes an AttentionView, a capture result or a capture record, not {type(source).__name__}"
        )
    records = list(items)
    if not records:
        raise ValueError("the capture recorded nothing: run the model inside `with capture(model)` first")
    return records


PAGE_BUDGET = 16 << 20
"""Bytes of head data above which a page from a capture carries the top keys per row instead of everything."""
MAX_TOP_K = 32
"""The most keys per row a compact page keeps."""


def _full_bytes(records: list[tuple[str, Any]]) -> int:
    """What the page data of every head in full would take: q, k, v, α, z per head as base64 float32."""
    total = 0
    for _, record in records:
        heads, queries, width = record.query.shape[-3:]
        keys, value_width = record.key.shape[-2], record.value.shape[-1]
        total += heads * queries * (2 * width + keys + 2 * value_width)
    return total * 4 * 4 // 3


def _compact_k(records: list[tuple[str, Any]], budget: int) -> int:
    """The most keys per row (up to :data:`MAX_TOP_K`) whose compact page fits ``budget``: 6 bytes per kept key
    (float32 weight, uint16 index) and 8 per row (rest, lse), base64, with a tenth of ``budget`` left for the
    rest of the page (tokens, names, JSON)."""
    rows = sum(record.query.shape[-3] * record.query.shape[-2] for _, record in records)
    return max(1, min(MAX_TOP_K, (budget * 9 // 10 * 3 // 4 // max(1, rows) - 8) // 6))


def _rollout_bytes(num_tokens: int) -> int:
    """The page data of a ``(T, T)`` rollout: base64 float32."""
    return num_tokens * num_tokens * 4 * 4 // 3


def capture_rollout(records: list[tuple[str, Any]], batch: int = 0) -> Any:
    """The whole model's attention rollout ``(T, T)`` from the records' weights, first layer first.

    Each layer's heads are averaged first (as :func:`selfattention.rollout.residual_attention` does), so only
    one layer's ``(H, T, T)`` weights are held at a time; the result is :func:`attention_rollout`'s ``[-1]``.
    """
    from selfattention.rollout import attention_rollout

    layers = []
    for _, record in records:
        weights = record.weights  # (B, H, T, T) or (H, T, T)
        if weights.dim() == 4:
            weights = weights[batch]
        layers.append(weights.float().mean(dim=0, keepdim=True))  # (H, T, T) -> (1, T, T)
    return attention_rollout(layers)[-1]


def view_from_capture(
    source: Any,
    tokens: Iterable[str],
    *,
    batch: int = 0,
    title: str = "Attention",
    budget: int = PAGE_BUDGET,
    top_k: int | None = None,
) -> AttentionView:
    """An :class:`AttentionView` from what :func:`selfattention.capture` recorded.

    When every head in full would take more than ``budget`` bytes of page data (or ``top_k`` is given), the
    view is compact: each head is a :class:`TopKHead` with the ``top_k`` largest weights of every row, exact,
    and the rest of the mass (``top_k`` defaults to the most, up to :data:`MAX_TOP_K`, that fit ``budget``).

    A capture of two or more layers also carries the whole model's attention rollout (:func:`capture_rollout`)
    when its ``T × T`` floats take at most a quarter of ``budget`` (about 880 tokens for :data:`PAGE_BUDGET`);
    the heads then get what is left of ``budget``.

    Args:
        source: the capture (every module that ran becomes a layer, in model order), a mapping of names to
            records, or a single record.
        tokens: the ``T`` tokens of the sequence that was run.
        batch: which batch row to show when the input was batched.
        title: shown at the top of the page.
        budget: bytes of head data above which the page is compact.
        top_k: keys kept per row; ``None`` decides by ``budget``.

    Raises:
        ValueError: when a record's weights are not ``(T, T)`` for the ``T`` tokens given, ``batch`` is out of
            range, or ``top_k`` is below 1.
    """
    tokens = [str(token) for token in tokens]
    records = _records(source)
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    with_rollout = len(records) > 1 and _rollout_bytes(len(tokens)) <= budget // 4
    if with_rollout:
        budget -= _rollout_bytes(len(tokens))
    compact = all(record_lse(record) is not None for _, record in records) and (
        top_k is not None or _full_bytes(records) > budget
    )
    k = top_k if top_k is not None else _compact_k(records, budget)
    layers: list[Sequence[HeadData | TopKHead]] = []
    names, scales, causal = [], [], False
    for name, record in records:
        if compact:
            layers.append(top_k_heads(record, len(tokens), k, batch=batch, name=name))
        else:
            layers.append(heads_from_record(record, len(tokens), batch=batch, name=name))
        names.append(name or "model")
        scales.append(float(record.scale))
        causal = causal or bool(record.causal)
    rollout = capture_rollout(records, batch).tolist() if with_rollout else None
    return AttentionView(tokens, layers, causal=causal, layer_names=names, scales=scales, title=title, rollout=rollout)


def record_lse(record: Any) -> Any:
    """The record's log-sum-exp, or ``None`` for a record that kept its weights (or has none)."""
    return getattr(record, "lse", None)


def _check_record(record: Any, num_tokens: int, batch: int, name: str) -> None:
    if record.query.dim() == 4 and not 0 <= batch < record.query.shape[0]:
        raise ValueError(f"batch {batch} out of range: {name!r} ran on {record.query.shape[0]} rows")
    shape = (record.query.shape[-2], record.key.shape[-2])
    if shape != (num_tokens, num_tokens):
        raise ValueError(
            f"{name!r} has weights of shape {shape} per head, but {num_tokens} tokens need ({num_tokens}, {num_tokens})"
        )


def top_k_heads(record: Any, num_tokens: int, k: int, *, batch: int = 0, name: str = "attention") -> list[TopKHead]:
    """One :class:`TopKHead` per query head of a capture record (recomputed exactly from its log-sum-exp).

    Raises:
        ValueError: as :func:`heads_from_record`.
    """
    _check_record(record, num_tokens, batch, name)
    weights, indices, rest = record.top_k(k)  # (..., H, T, k), (..., H, T, k), (..., H, T)
    lse = record_lse(record)
    if record.query.dim() == 4:
        weights, indices, rest, lse = weights[batch], indices[batch], rest[batch], lse[batch]
    return [TopKHead(weights[h], indices[h], rest[h], lse[h]) for h in range(weights.shape[0])]


def heads_from_record(record: Any, num_tokens: int, *, batch: int = 0, name: str = "attention") -> list[HeadData]:
    """One :class:`HeadData` per query head of a capture record; with grouped-query attention, query head
    ``h`` reads key/value head ``h // (H // G)`` (as ``Record.head`` does).

    Raises:
        ValueError: when the record's weights are not ``(num_tokens, num_tokens)``, or ``batch`` is out of
            range for a batched record.
    """
    tensors = [record.query, record.key, record.value, record.scores, record.weights, record.context]
    if tensors[0].dim() == 4:  # (B, H, T, D): pick one batch row
        if not 0 <= batch < tensors[0].shape[0]:
            raise ValueError(f"batch {batch} out of range: {name!r} ran on {tensors[0].shape[0]} rows")
        tensors = [tensor[batch] for tensor in tensors]
    if tuple(tensors[4].shape[-2:]) != (num_tokens, num_tokens):
        raise ValueError(
            f"{name!r} has weights of shape {tuple(tensors[4].shape[-2:])} per head, but "
            f"{num_tokens} tokens need ({num_tokens}, {num_tokens})"
        )
    # One conversion per tensor, not per head: many small torch calls are slow on a busy machine.
    query, key, value, scores, weights, context = (t.detach().float().cpu().tolist() for t in tensors)
    group = len(query) // len(key)
    return [
        HeadData.from_lists(
            query=query[h],
            key=key[h // group],
            value=value[h // group],
            scores=scores[h],
            weights=weights[h],
            context=context[h],
        )
        for h in range(len(query))
    ]


def to_html(
    source: Any,
    tokens: Iterable[str] | None = None,
    *,
    batch: int = 0,
    title: str = "Attention",
    top_k: int | None = None,
) -> ViewerHTML:
    """The viewer page for ``source``: one self-contained HTML document, nothing fetched from a network.

    Args:
        source: an :class:`AttentionView`, or what :func:`selfattention.capture` recorded (the capture, a
            mapping of module names to records, or one record).
        tokens: the tokens of the sequence; required for a capture, ignored for a view.
        batch: which batch row of a capture to show.
        title: shown at the top of the page (for a capture).
        top_k: keys kept per row for a capture (a compact page); by default every weight when the page data
            stays under :data:`PAGE_BUDGET`, else the most keys per row that fit (see :func:`view_from_capture`).

    Returns:
        The page as a :class:`ViewerHTML` string; a notebook displays it in an iframe.

    Raises:
        TypeError: for a source of another kind. ValueError: when shapes and tokens disagree.
    """
    if isinstance(source, AttentionView):
        return source.to_html()
    if tokens is None:
        raise ValueError("to_html needs the tokens when given a capture (one string per query position)")
    return view_from_capture(source, tokens, batch=batch, title=title, top_k=top_k).to_html()
