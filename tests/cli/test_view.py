"""``selfattention view``: the file it writes, its errors, and serving the page on 127.0.0.1."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from selfattention.cli import main
from selfattention.viz.serve import make_server
from selfattention.viz.sources import example_view


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["view", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_default_writes_the_worked_example(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(capsys)
    assert code == 0
    assert out.startswith("wrote attention-view.html (6 tokens, 2 layers, 5 heads, ")
    assert (tmp_path / "attention-view.html").read_text(encoding="utf-8") == example_view().to_html()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["attention-view.html"]  # no temporary file left


def test_text_heads_and_causal(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out_file = tmp_path / "cat.html"
    code, out, _ = run(capsys, "the cat sat", "--heads", "2", "--causal", "--out", str(out_file))
    assert code == 0 and "3 tokens, 2 layers, 3 heads" in out
    assert out_file.read_text(encoding="utf-8") == example_view("the cat sat", num_heads=2, causal=True).to_html()


def test_bad_input_leaves_an_existing_file_alone(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    target = tmp_path / "view.html"
    target.write_text("old")
    code, _, err = run(capsys, "--heads", "0", "--out", str(target))
    assert code == 2 and err == "selfattention view: error: --heads must be at least 1, got 0\n"
    assert target.read_text() == "old"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--out", "/nonexistent-folder/x.html"], "folder /nonexistent-folder does not exist"),
        (["   "], "the text to view is empty"),
        (
            ["--model", "no-such-model"],
            "'no-such-model' is not 'example', 'minilm', 'smollm2', a .gguf file or an existing checkpoint",
        ),
        (["--serve", "--port", "70000"], "--port must be in 0..65535, got 70000"),
        (["--port", "8001"], "--port is only used with --serve"),
        (["--window", "3"], "--window is only used with --cache"),
        (["--max-new-tokens", "3"], "--max-new-tokens is only used with --cache"),
        (["--model", "minilm", "--causal"], "--causal is only used with --model example"),
        (["--model", "minilm", "--seed", "3"], "--seed is only used with --model example"),
        (["--out", "."], "cannot write .: it is a folder"),
    ],
)
def test_bad_input_is_one_line(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert err.count("\n") == 1 and message in err


def test_serves_the_page_on_localhost() -> None:
    page = example_view().to_html()
    server = make_server(page, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        assert host == "127.0.0.1"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
            assert response.headers["Content-Type"] == "text/html; charset=utf-8"
            assert response.read().decode("utf-8") == page
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=10)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    assert not thread.is_alive()


def test_the_command_serves_until_interrupted(tmp_path: Path) -> None:
    out_file = tmp_path / "served.html"
    process = subprocess.Popen(
        [sys.executable, "-m", "selfattention", "view", "--serve", "--port", "0", "--out", str(out_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # As at a terminal, where Ctrl-C reaches the command: a suite started as a background job (`cmd &`)
        # has SIGINT ignored, and an ignored signal stays ignored across exec.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert process.stdout is not None
        wrote, serving = process.stdout.readline(), process.stdout.readline()
        assert wrote.startswith(f"wrote {out_file} ")
        assert serving.startswith("serving http://127.0.0.1:")
        url = serving.split()[1]
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.read().decode("utf-8") == out_file.read_text(encoding="utf-8")
    finally:
        process.send_signal(signal.SIGINT)
        try:
            _, err = process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()  # never leave a server behind
            raise
    assert process.returncode == 0, err
    assert err.strip() == "stopped"
