"""The command line on Llama-family GGUF models: SmolLM2 through generate, explain and view; bad files; --model."""

from __future__ import annotations

from pathlib import Path

import pytest

from gguf_files import tiny_weights, write_tiny_gguf
from selfattention.cli import main
from selfattention.loaders.language_model import LanguageModel

pytest.importorskip("gguf", reason="the pretrained extra is missing; `make install-test` installs it")


@pytest.fixture
def loaded_once(smollm2: LanguageModel, monkeypatch: pytest.MonkeyPatch) -> LanguageModel:
    """The session's SmolLM2 stands in for a fresh load in each command."""
    import selfattention.loaders.gguf as loader

    monkeypatch.setattr(loader, "load_smollm2", lambda: smollm2)
    return smollm2


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", tiny_weights(), qtype="Q8_0")


@pytest.mark.slow
def test_generate_prints_the_greedy_continuation(loaded_once: LanguageModel, capsys) -> None:  # type: ignore[no-untyped-def]
    prompt = "The capital of France is"
    assert main(["generate", "--model", "smollm2", prompt, "--max-new-tokens", "8", "--temperature", "0"]) == 0
    expected = loaded_once.decode(loaded_once.generate(prompt, 8, temperature=0.0))
    assert capsys.readouterr().out == prompt + expected + "\n"


@pytest.mark.slow
def test_generate_chat_uses_the_files_template(loaded_once: LanguageModel, capsys) -> None:  # type: ignore[no-untyped-def]
    message = "What is the capital of France?"
    assert (
        main(["generate", "--model", "smollm2", "--chat", message, "--max-new-tokens", "12", "--temperature", "0"]) == 0
    )
    new = loaded_once.generate(loaded_once.chat_prompt(message), 12, temperature=0.0)
    if new and new[-1] == loaded_once.eos_token_id:
        new = new[:-1]
    assert capsys.readouterr().out == message + "\n" + loaded_once.decode(new) + "\n"


@pytest.mark.slow
def test_explain_and_view_read_smollm2(loaded_once: LanguageModel, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["explain", "--model", "smollm2", "The capital of France", "--head", "8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("attention weights α of layer 29 of 30, head 8 of 9 (smollm2)")
    assert "  3 ␣France   -> " in out
    page = tmp_path / "view.html"
    assert main(["view", "--model", "smollm2", "The capital of France", "--out", str(page)]) == 0
    assert "(4 tokens, 30 layers, 270 heads," in capsys.readouterr().out
    assert page.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


def test_a_gguf_file_generates_and_explains(tiny_file: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["generate", "--model", str(tiny_file), "ab", "--max-new-tokens", "3", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("ab")
    assert main(["explain", "--model", str(tiny_file), "hello", "--layer", "0", "--head", "3"]) == 0
    assert "layer 0 of 2, head 3 of 4" in capsys.readouterr().out


def run_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1, captured.err
    return captured.err


def test_bad_files_are_one_line_and_exit_2(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    other = write_tiny_gguf(tmp_path / "falcon.gguf", tiny_weights(), arch="falcon")
    assert "architecture is 'falcon'; only llama" in run_error(["generate", "--model", str(other), "hi"], capsys)
    iq = write_tiny_gguf(tmp_path / "iq.gguf", tiny_weights(), qtype="IQ4_NL")
    assert "has type IQ4_NL, which this loader" in run_error(["explain", "--model", str(iq), "hi"], capsys)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(write_tiny_gguf(tmp_path / "whole.gguf", tiny_weights()).read_bytes()[:5000])
    assert "is truncated" in run_error(["view", "--model", str(cut), "hi"], capsys)
    text = tmp_path / "notes.gguf"
    text.write_text("just text", encoding="utf-8")
    assert "is not a GGUF file" in run_error(["generate", "--model", str(text), "hi"], capsys)
    assert "no GGUF file" in run_error(["generate", "--model", str(tmp_path / "none.gguf"), "hi"], capsys)


def test_bad_prompts_are_one_line_and_exit_2(tiny_file: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    err = run_error(["generate", "--model", str(tiny_file), "x" * 40, "--max-new-tokens", "2"], capsys)
    assert "the prompt (40 tokens) + --max-new-tokens (2) = 42 exceeds the context of 32; shorten them, or " in err
    err = run_error(["generate", "--model", str(tiny_file), "abc", "--max-new-tokens", "40"], capsys)
    assert "exceeds the context of 32; shorten them, or stream past the context with --cache window or" in err
    assert run_error(["generate", "--model", str(tiny_file), "--checkpoint", str(tiny_file), "hi"], capsys).endswith(
        "choose one of --model NAME and --checkpoint DIR\n"
    )
    assert "the prompt is empty" in run_error(["generate", "--model", str(tiny_file), ""], capsys)
    assert "has no chat template" in run_error(["generate", "--model", str(tiny_file), "hi", "--chat"], capsys)
    assert "more than the context of 32" in run_error(["explain", "--model", str(tiny_file), "y" * 40], capsys)


def test_each_command_says_which_models_it_takes(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert "generate does not take --model minilm" in run_error(["generate", "--model", "minilm", "hi"], capsys)
    assert "generate does not take --model example" in run_error(["generate", "--model", "example", "hi"], capsys)
    assert "context does not take --model example" in run_error(["context", "--model", "example"], capsys)
    err = run_error(["explain", "--model", "gpt-5"], capsys)
    assert "'gpt-5' is not example, minilm, smollm2, a FILE.gguf or a CHECKPOINT_DIR" in err
    assert "give the model" in run_error(["generate", "hi"], capsys)
