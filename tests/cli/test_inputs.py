"""No traceback for input: each bad file or value is one line on stderr and exit code 2.

The reproductions of issue 11, then fuzzed embeddings files and checkpoint folders: valid files truncated,
with bytes flipped, with pieces swapped, with oversized values. A fuzzed file may still be valid (exit 0);
anything else must be exactly one line and exit 2, never a traceback.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from selfattention.cli import main
from selfattention.cli.view import MAX_TOKENS

pytestmark = pytest.mark.usefixtures("one_thread")


def one_line_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str], message: str = "") -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith(f"selfattention {argv[0]}: error: "), err
    assert message in err, err
    return err


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.npy", b"", "not a readable .npy array"),
        ("digits.json", b'{"tokens": ["a"], "embeddings": [[1' + b"0" * 500 + b"]]}", "an integer of 501 digits"),
        ("deep.json", b"[" * 100_000 + b"]" * 100_000, "JSON nested too deeply to read"),
        ("nan.json", b'{"tokens": ["a"], "embeddings": [[NaN]]}', "NaN is not valid JSON"),
        ("long.csv", b"a," + b"1" * 131_073 + b"\n", "not a readable CSV file (field larger than field limit"),
        ("nul.csv", b"a,1\x00,2\n", "row 0, column 1 is not a number: '1\\x00'"),
    ],
)
def test_issue_reproductions_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, content: bytes, message: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    tokens = ["--tokens", "a b"] if name.endswith(".npy") else []
    one_line_exit_2(capsys, ["explain", "--embeddings", str(path), *tokens], message)


def test_arrays_that_are_not_real_embeddings_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for dtype, message in [
        (np.complex64, "complex values (complex64) are not embeddings; save the real part"),
        (np.bool_, "expected a 2-d numeric array (tokens × width), got 2-d bool"),
        ("U3", "expected a 2-d numeric array (tokens × width), got 2-d <U3"),
    ]:
        np.save(tmp_path / "e.npy", np.ones((2, 3), dtype=dtype))
        one_line_exit_2(capsys, ["explain", "--embeddings", str(tmp_path / "e.npy"), "--tokens", "a b"], message)
    np.save(tmp_path / "e.npy", np.array([[1e39, 1.0], [0.0, 1.0]]))
    one_line_exit_2(capsys, ["explain", "--embeddings", str(tmp_path / "e.npy"), "--tokens", "a b"], "1e+39")
    np.savez(tmp_path / "z.npz", a=np.ones((2, 2)))
    shutil.move(tmp_path / "z.npz", tmp_path / "z.npy")
    one_line_exit_2(capsys, ["explain", "--embeddings", str(tmp_path / "z.npy"), "--tokens", "a b"], ".npz archive")


@pytest.mark.parametrize("width", ["100000000", "4097", "0", "-3"])
def test_projection_widths_are_bounded(capsys: pytest.CaptureFixture[str], width: str) -> None:
    # a value argparse refuses: the command's usage, then one error line naming the option, exit 2
    with pytest.raises(SystemExit) as stop:
        main(["explain", "--projections", width])
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert err.splitlines()[-1] == (
        f"selfattention explain: error: argument --projections: must be between 1 and 4096, got {width}"
    ), err


def test_the_viewer_refuses_text_beyond_its_limit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "view.html"
    words = " ".join(f"w{i}" for i in range(MAX_TOKENS + 1))
    one_line_exit_2(
        capsys, ["view", words, "--out", str(out)], f"the text has {MAX_TOKENS + 1} tokens; the viewer shows at most"
    )
    assert not out.exists()
    assert main(["view", " ".join(words.split()[:MAX_TOKENS]), "--out", str(out)]) == 0  # the limit itself is fine
    assert f"{MAX_TOKENS} tokens" in capsys.readouterr().out


# Fuzzing ----------------------------------------------------------------------------------------------------


def mutations(data: bytes, seed: int, count: int) -> Iterator[tuple[str, bytes]]:
    """Truncations, byte flips, swapped chunks and spliced huge numbers of ``data``, reproducibly."""
    rng = random.Random(seed)
    for _ in range(count):
        kind = rng.choice(["truncate", "flip", "swap", "huge"])
        if kind == "truncate":
            cut = rng.randrange(len(data))
            yield f"truncate at {cut}", data[:cut]
        elif kind == "flip":
            where = sorted(rng.sample(range(len(data)), k=min(len(data), rng.choice([1, 2, 8, 64]))))
            flipped = bytearray(data)
            for i in where:
                flipped[i] ^= 1 << rng.randrange(8)
            yield f"flip {where[:4]}...", bytes(flipped)
        elif kind == "swap":
            a, b = sorted(rng.sample(range(len(data)), 2))
            size = rng.randrange(1, 1 + min(32, len(data) - b))
            swapped = data[:a] + data[b : b + size] + data[a + size : b] + data[a : a + size] + data[b + size :]
            yield f"swap {a} and {b} ({size} bytes)", swapped[: len(data)]
        else:
            at = rng.randrange(len(data))
            number = rng.choice([b"1e39", b"-1e999", b"9" * 400, b"1e-400", b"340282356779733661637539395458142568448"])
            yield f"insert {number[:12]!r} at {at}", data[:at] + number + data[at:]


def fuzz(
    capsys: pytest.CaptureFixture[str],
    argv: Callable[[], list[str]],
    write: Callable[[bytes], None],
    data: bytes,
    seed: int,
    count: int,
) -> dict[int, int]:
    codes: dict[int, int] = {}
    for what, mutated in mutations(data, seed, count):
        write(mutated)
        try:
            code = main(argv())
        except BaseException as error:  # any escape is the failure being hunted
            raise AssertionError(f"{what}: {type(error).__name__} escaped: {error}") from error
        _, err = capsys.readouterr()
        assert code in (0, 2), f"{what}: exit {code}"
        if code == 2:
            assert err.count("\n") == 1 and "Traceback" not in err, f"{what}: {err}"
        codes[code] = codes.get(code, 0) + 1
    return codes


@pytest.mark.parametrize("suffix", [".json", ".csv", ".npy"])
def test_fuzzed_embeddings_files_are_one_line_or_fine(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], suffix: str
) -> None:
    tokens, rows = ["Your", "journey", "starts"], [[0.43, 0.15, 0.89], [0.55, 0.87, 0.66], [0.57, 0.85, 0.64]]
    path = tmp_path / f"e{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps({"tokens": tokens, "embeddings": rows}))
    elif suffix == ".csv":
        path.write_text(
            "token,a,b,c\n" + "".join(f"{t},{','.join(map(str, r))}\n" for t, r in zip(tokens, rows, strict=True))
        )
    else:
        np.save(path, np.array(rows, dtype=np.float32))
    extra = ["--tokens", " ".join(tokens)] if suffix == ".npy" else []
    codes = fuzz(
        capsys,
        lambda: ["explain", "--embeddings", str(path), *extra],
        path.write_bytes,
        path.read_bytes(),
        seed=sum(map(ord, suffix)),
        count=300,
    )
    assert codes.get(2, 0) > 30, codes  # the mutations did reach the checks


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("fuzz")
    (folder / "corpus.txt").write_text("To be, or not to be.\n" * 40, encoding="utf-8")
    argv = ["train", "--corpus", str(folder / "corpus.txt"), "--out", str(folder / "ckpt"), "--config", "tiny"]
    assert (
        main([*argv, "--width", "16", "--context", "16", "--steps", "2", "--eval-interval", "2", "--no-progress"]) == 0
    )
    return folder / "ckpt"


@pytest.mark.parametrize(
    "name", ["latest.json", "config.json", "model.safetensors", "trainer.safetensors", "tokenizer.json"]
)
def test_fuzzed_checkpoint_folders_are_one_line_or_fine(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    folder = Path(shutil.copytree(trained, tmp_path / "ckpt"))
    step = folder / json.loads((folder / "latest.json").read_text())["folder"]
    path = folder / name if name == "latest.json" else step / name
    original = path.read_bytes()
    command = [
        "train",
        "--resume",
        "--out",
        str(folder),
        "--corpus",
        str(trained.parent / "corpus.txt"),
        "--no-progress",
    ]
    argv = iter([["generate", "To", "--checkpoint", str(folder), "--max-new-tokens", "2"], command] * 40)
    codes = fuzz(capsys, lambda: next(argv), path.write_bytes, original, seed=len(name), count=80)
    assert codes.get(2, 0) >= (40 if name.endswith(".safetensors") or name == "tokenizer.json" else 20), codes
    path.write_bytes(original)
    assert main(["generate", "To", "--checkpoint", str(folder), "--max-new-tokens", "2"]) == 0  # the control


def test_own_embeddings_default_to_their_first_token_and_all_excludes_query(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The worked example's default query ("journey") is not a token of other embeddings: the first is."""
    import json

    path = tmp_path / "e.json"
    path.write_text('{"tokens": ["a", "b", "c"], "embeddings": [[1, 0], [0, 1], [1, 1]]}', encoding="utf-8")
    assert main(["explain", "--embeddings", str(path), "--format", "json"]) == 0
    assert [step["token"] for step in json.loads(capsys.readouterr().out)["walkthrough"]] == ["a"]
    assert main(["explain", "--all", "--query", "2"]) == 2
    assert capsys.readouterr().err.endswith("choose one of --query (one token) and --all (every token)\n")
