"""Write docs/walkthrough-notebook.ipynb from the cells below, executed, with its outputs stored.

    python tools/make_walkthrough_notebook.py      # after `make test` (nbclient, ipykernel) and activating .venv

The docs site shows the stored outputs; tests/test_notebook.py executes the notebook again and checks that
they are what the code prints, and that the notebook's cells are the ones below.
"""

from __future__ import annotations

from pathlib import Path

import nbformat

CELLS: list[tuple[str, str]] = [
    (
        "markdown",
        """# The worked example, one step at a time

Self-attention rewrites each token's vector from its context. This notebook computes it by hand for the
sentence "Your journey starts with one step", each word embedded in 3 dimensions, for the query "journey",
with W^Q = W^K = W^V = identity, and checks every step against `selfattention`. The same numbers are printed
by `selfattention explain`.

1. **project**: q_i = x_i W^Q, k_j = x_j W^K, v_j = x_j W^V
2. **scores**: ω_ij = q_i · k_j
3. **weights**: α_ij = softmax_j(ω_ij)
4. **context**: z_i = Σ_j α_ij v_j""",
    ),
    (
        "code",
        """import torch

from selfattention import attention, attention_scores, attention_weights, context_vectors
from selfattention.examples import TOKENS, embeddings

x = embeddings()  # (T, C) = (6, 3): one row per token
for token, row in zip(TOKENS, x, strict=True):
    print(f"{token:<8}", row)""",
    ),
    (
        "markdown",
        """## Step 1: project

With W = identity, each token's query, key and value is its own embedding. The query is the row of
"journey" (index 1).""",
    ),
    (
        "code",
        """W_query = W_key = W_value = torch.eye(3)
queries, keys, values = x @ W_query, x @ W_key, x @ W_value
i = TOKENS.index("journey")
q = queries[i]
print(i, q)""",
    ),
    (
        "markdown",
        """## Step 2: scores

ω_j = q · k_j, one dot product per token of the sentence: how well each key matches the query.""",
    ),
    (
        "code",
        """scores = torch.tensor([torch.dot(q, k_j) for k_j in keys])  # one at a time
print(scores)
print(torch.allclose(scores, keys @ q), torch.allclose(scores, attention_scores(q, keys)))""",
    ),
    (
        "markdown",
        """## Step 3: weights

α = softmax(ω): every weight positive, summing to 1. "journey" attends most to itself and to "starts".""",
    ),
    (
        "code",
        """weights = torch.exp(scores) / torch.exp(scores).sum()
print(weights, f"sum = {weights.sum():.4f}")
print(torch.allclose(weights, attention_weights(scores)))""",
    ),
    (
        "markdown",
        """## Step 4: context

z = Σ_j α_j v_j: a weighted average of the **value rows**, so it has 3 numbers, one per embedding dimension.""",
    ),
    (
        "code",
        """context = torch.zeros(values.shape[1])  # as wide as one value vector
for alpha_j, v_j in zip(weights, values, strict=True):
    context += alpha_j * v_j
print(context)
print(torch.allclose(context, weights @ values), torch.allclose(context, context_vectors(weights, values)))""",
    ),
    (
        "markdown",
        """## Why `[0.4371, 0.4371, 0.4371, 0.4371, 0.4371, 0.4371]` is wrong

A version of this example shared widely online prints six equal numbers as the context vector of "journey".
Its step 4 reads:

```python
context_vec_2 = torch.empty(inputs.shape[0])
for i, x_i in enumerate(query):
    context_vec_2 += attn_weights_2[i] * x_i
```

Two mistakes:

- `torch.empty(inputs.shape[0])` has the length of the **sequence** (6), not of a value vector (3), and its
  memory is **not initialised**: the sum starts from whatever the memory held.
- the loop runs over the 3 components of the **query**, not over the 6 value rows; each step adds the scalar
  α_i · q_i to all six entries.

Starting from zeros makes the result repeatable and shows where 0.4371 comes from:""",
    ),
    (
        "code",
        """wrong = torch.zeros(x.shape[0])  # the sequence's length; the original starts from torch.empty
for k, q_k in enumerate(q):      # the query's 3 components, not the value rows
    wrong += weights[k] * q_k
print(wrong)
print(f"{sum(weights[k] * q[k] for k in range(3)):.4f} = "
      + " + ".join(f"{weights[k]:.4f}·{q[k]:.2f}" for k in range(3)))""",
    ),
    (
        "markdown",
        """Every entry is α_0 q_0 + α_1 q_1 + α_2 q_2: three of the six weights times the query's own numbers. No value
row enters at all. With `torch.empty` the six numbers are that plus leftover memory, so they may differ from run
to run. The right answer is the one above: **z = [0.4419, 0.6515, 0.5683]**.

## Every query at once

In matrix form the four steps are Ω = Q Kᵀ, A = softmax(Ω) row by row, Z = A V, which is what
`selfattention.attention` computes (here unscaled: `scale=1`).""",
    ),
    (
        "code",
        """A = torch.softmax(queries @ keys.T, dim=-1)  # (T, T), each row sums to 1
Z = A @ values                              # (T, C): one context vector per token
print(A[i])
print(Z)
print(torch.allclose(Z, attention(queries, keys, values, scale=1.0)))""",
    ),
]


def build() -> nbformat.NotebookNode:
    """The notebook, without outputs."""
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    notebook.metadata["language_info"] = {"name": "python"}
    make = {"markdown": nbformat.v4.new_markdown_cell, "code": nbformat.v4.new_code_cell}
    notebook.cells = [make[kind](source) for kind, source in CELLS]
    for number, cell in enumerate(notebook.cells):
        cell["id"] = f"cell-{number}"
    return notebook


def execute(notebook: nbformat.NotebookNode, folder: Path) -> nbformat.NotebookNode:
    """Run every cell of ``notebook`` in a fresh ``python3`` kernel started in ``folder``; returns it."""
    from nbclient import NotebookClient

    client = NotebookClient(
        notebook, timeout=300, kernel_name="python3", record_timing=False, resources={"metadata": {"path": folder}}
    )
    client.execute()
    return notebook


NOTEBOOK = Path(__file__).resolve().parents[1] / "docs" / "walkthrough-notebook.ipynb"

if __name__ == "__main__":
    nbformat.write(execute(build(), NOTEBOOK.parent), NOTEBOOK)
    print(f"wrote {NOTEBOOK}")
