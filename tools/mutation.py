"""Mutation testing of the core files, each against its own tests only (``make mutation``; not run in CI).

For each file chosen, a scratch copy of ``src/``, ``tests/`` and ``pyproject.toml`` is made under
``build/mutation/<name>/`` with a ``setup.cfg`` that tells mutmut which file to mutate and which tests to run;
mutmut then runs every mutant against the tests that cover the mutated function, and the scores are printed
(and, with ``--write FILE``, appended as a Markdown table). Survivors are listed with ``mutmut show NAME`` run
in that folder.

    python tools/mutation.py generate training/checkpoint     # some files
    python tools/mutation.py --all --max-children 2           # every file of the table below
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# file under src/selfattention (without .py) -> its own tests
OWN_TESTS: dict[str, list[str]] = {
    # attention()'s input contract, its log-sum-exp and its empty inputs are tested beside the other entry points
    "functional": [
        "tests/test_functional.py",
        "tests/test_grouped_rows.py",
        "tests/test_contract.py",
        "tests/test_exact_weights.py",
    ],
    "masks": ["tests/test_masks.py", "tests/backends/test_flex.py::test_mask_mod_builds_the_description_s_own_mask"],
    "modules": ["tests/test_modules.py", "tests/test_multihead.py", "tests/test_modules_masks.py"],
    "backends/tiled": ["tests/backends/test_tiled.py"],
    "backends/blocksparse": ["tests/test_fast_attention.py", "tests/backends/test_blocksparse_runs.py"],
    "training/checkpoint": [
        "tests/training/test_checkpoint.py",
        "tests/training/test_save_kill.py",
        "tests/training/test_recipe.py",
    ],
    "generate": ["tests/test_generate.py", "tests/models/test_gpt.py"],
    "models/bert": ["tests/models/test_bert.py"],
    "files": ["tests/test_files.py"],
}


def run_one(name: str, max_children: int) -> tuple[dict[str, int], float]:
    """Mutate ``src/selfattention/<name>.py`` against its own tests; the count of each outcome and the seconds."""
    work = ROOT / "build" / "mutation" / name.replace("/", "-")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shutil.copytree(ROOT / "src", work / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copytree(ROOT / "tests", work / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", work / "pyproject.toml")  # it has no [tool.mutmut]: setup.cfg is read
    tests = "\n    ".join(OWN_TESTS[name])
    (work / "setup.cfg").write_text(
        "[mutmut]\nsource_paths=src\n"
        f"only_mutate=src/selfattention/{name}.py\n"
        f"pytest_add_cli_args_test_selection={tests}\n"
        # a 5 s subprocess measuring memory, not values: it would add 5 s to every mutant of attention()
        "pytest_add_cli_args=-p no:cacheprovider -q "
        "--deselect=tests/test_exact_weights.py::test_top_k_at_8192_tokens_keeps_the_process_peak_bounded\n"
    )
    mutmut = str(Path(sys.executable).parent / "mutmut")
    start = time.perf_counter()
    # One thread per mutant run: mutmut forks its workers from a process that has run torch, and a child of a
    # fork whose parent started OpenMP's thread pool spins forever at its first parallel region (every mutant
    # that reached one was reported as a timeout). The runs themselves are parallel (--max-children).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    subprocess.run(
        [mutmut, "run", "--max-children", str(max_children)], cwd=work, env=env, check=True, capture_output=True
    )
    seconds = time.perf_counter() - start
    listing = subprocess.run([mutmut, "results", "--all", "true"], cwd=work, check=True, capture_output=True, text=True)
    counts: dict[str, int] = {}
    for status in re.findall(r"^\s*\S+: (.+)$", listing.stdout, flags=re.MULTILINE):
        counts[status.strip()] = counts.get(status.strip(), 0) + 1
    return counts, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", help=f"files to mutate, among {list(OWN_TESTS)}")
    parser.add_argument("--all", action="store_true", help="every file of the table")
    parser.add_argument("--max-children", type=int, default=2, help="parallel mutant runs (default: 2)")
    parser.add_argument("--write", metavar="FILE.md", help="also append the table to this file")
    args = parser.parse_args()
    names = list(OWN_TESTS) if args.all else args.files
    unknown = [n for n in names if n not in OWN_TESTS]
    if not names or unknown:
        parser.error(f"name files among {list(OWN_TESTS)} (unknown: {unknown}), or pass --all")
    lines = [
        "| file | mutants | killed | timeout | survived | no tests | other | score | minutes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    print("\n".join(lines), flush=True)
    for name in names:
        counts, seconds = run_one(name, args.max_children)
        killed, timeout, survived = (counts.get(status, 0) for status in ("killed", "timeout", "survived"))
        untested = counts.get("no tests", 0)  # mutants of code that the file's own tests never run
        other = (
            sum(counts.values()) - killed - timeout - survived - untested
        )  # "suspicious" (slow, passed) and the like
        caught = killed + timeout  # a mutant that makes the tests run 30x their time is caught, as mutmut counts
        score = 100 * caught / max(1, caught + survived)
        line = (
            f"| `{name}.py` | {sum(counts.values())} | {killed} | {timeout} | {survived} | {untested} | {other} | "
            f"{score:.0f}% | {seconds / 60:.1f} |"
        )
        lines.append(line)
        print(line, flush=True)
    if args.write:
        with open(args.write, "a", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
