"""The ctxpress command line: output formats, exit codes and one-line errors."""

import io
import json
import subprocess
import sys

import pytest

from ctxpress.cli import main

JSON_KEYS = {"compressed_text", "kept_token_indices", "origin_tokens", "compressed_tokens", "rate", "seconds",
             "method"}


@pytest.fixture
def doc(tmp_path, text):
    path = tmp_path / "doc.txt"
    path.write_text(text, encoding="utf-8")
    return path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_plain_output(capsys, doc, tiny_model_dir):
    code, out, err = run(capsys, "compress", doc, "--rate", "0.5", "--model", tiny_model_dir, "--stats")
    assert code == 0
    assert out.strip() and len(out) < len(doc.read_text())
    assert "kept" in err and "tokens" in err


def test_json_output(capsys, doc, tiny_model_dir):
    code, out, _ = run(capsys, "compress", doc, "--target-tokens", "25", "--model", tiny_model_dir, "--json",
                       "--question", "What is kept?", "--method", "entropy")
    assert code == 0
    result = json.loads(out)
    assert set(result) >= JSON_KEYS
    assert result["compressed_tokens"] == 25 and result["method"] == "entropy"
    assert result["compressed_prompt"].endswith("What is kept?")


def test_stdin(capsys, monkeypatch, text, tiny_model_dir):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.encode())))
    code, out, _ = run(capsys, "compress", "-", "--rate", "0.3", "--model", tiny_model_dir, "--json")
    assert code == 0 and json.loads(out)["origin_tokens"] > 0


def test_method_options(capsys, doc, tiny_model_dir):
    code, out, _ = run(capsys, "compress", doc, "--rate", "0.5", "--model", tiny_model_dir, "--json",
                       "--option", "stages=3", "--option", "alpha=0.5", "--option", "consecutive=false")
    settings = json.loads(out)["settings"]
    assert code == 0 and settings["stages_run"] == 3 and settings["alpha"] == 0.5
    assert settings["consecutive"] is False


def test_option_stages(capsys, doc, tiny_model_dir):
    code, out, err = run(capsys, "compress", doc, "--rate", "0.5", "--model", tiny_model_dir, "--json",
                         "--option", "stages=2")
    assert code == 0, err
    result = json.loads(out)
    assert result["settings"]["stages"] == 2 and result["settings"]["stages_run"] == 2
    assert result["method"] == "dac-words"
    code, out, _ = run(capsys, "compress", doc, "--rate", "0.5", "--model", tiny_model_dir, "--json",
                       "--method", "llmlingua", "--option", "segment-tokens=20")
    assert code == 0 and json.loads(out)["settings"]["segment_tokens"] == 20


def test_help_lists_methods_with_their_options(capsys):
    from ctxpress.options import option_names
    from ctxpress.prompt.methods import METHODS

    for command in ("compress", "batch"):
        code, out, _ = run(capsys, command, "--help")
        text = " ".join(out.split())
        assert code == 0 and "--option KEY=VALUE" in text
        for name, cls in METHODS.items():
            assert f"{name}: {cls.description()} (" in text
            assert all(f"{key}=" in text for key in option_names(cls))
    assert ("unit=token, line_breaks=score, stages=auto, consecutive=true, unit_score=mean, alpha=0.8, "
            "fusion=additive") in text


def bad_inputs(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"  \n")
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\x7fELF\x00\x01\x02")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("café".encode("latin-1"))
    return {"empty": empty, "binary": binary, "latin": latin}


@pytest.mark.parametrize(
    "case,argv,needle",
    [
        ("empty", ["{empty}", "--rate", "0.5"], "empty"),
        ("binary", ["{binary}", "--rate", "0.5"], "binary"),
        ("utf8", ["{latin}", "--rate", "0.5"], "UTF-8"),
        ("missing", ["{tmp}/nope.txt", "--rate", "0.5"], "cannot read"),
        ("rate high", ["{doc}", "--rate", "1.5"], "--rate"),
        ("rate zero", ["{doc}", "--rate", "0"], "--rate"),
        ("rate text", ["{doc}", "--rate", "half"], "--rate"),
        ("no budget", ["{doc}"], "required"),
        ("two budgets", ["{doc}", "--rate", "0.5", "--target-tokens", "4"], "not allowed"),
        ("target", ["{doc}", "--target-tokens", "100000"], "more than"),
        ("method", ["{doc}", "--rate", "0.5", "--method", "zip"], "invalid choice"),
        ("option", ["{doc}", "--rate", "0.5", "--option", "bogus=1"],
         "method 'dac-words' has no option bogus (it takes: unit, line_breaks, stages, consecutive, unit_score, "
         "alpha, fusion, attention_from)"),
        ("option 2", ["{doc}", "--rate", "0.5", "--method", "random", "--option", "alpha=0.5"], "no option alpha"),
        ("option type", ["{doc}", "--rate", "0.5", "--option", "stages=1.5"], "stages must be an integer"),
        ("option bool", ["{doc}", "--rate", "0.5", "--option", "consecutive=maybe"], "true or false"),
        ("option range", ["{doc}", "--rate", "0.5", "--option", "alpha=2"], "alpha must be in [0, 1]"),
        ("option choice", ["{doc}", "--rate", "0.5", "--option", "fusion=bogus"], "fusion must be"),
        ("option seg", ["{doc}", "--rate", "0.5", "--method", "llmlingua", "--option", "segment_tokens=0"],
         "segment_tokens must be a positive integer"),
        ("option form", ["{doc}", "--rate", "0.5", "--option", "stages"], "KEY=VALUE"),
        ("old flag", ["{doc}", "--rate", "0.5", "--stages", "2"], "unrecognized arguments"),
    ],
)
def test_bad_input_is_one_line_exit_2(capsys, tmp_path, doc, tiny_model_dir, case, argv, needle):
    files = {**bad_inputs(tmp_path), "doc": doc, "tmp": tmp_path}
    argv = [a.format(**files) for a in argv]
    code, out, err = run(capsys, "compress", *argv, "--model", tiny_model_dir)
    assert code == 2, err
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in err


def test_bad_option_fails_before_the_model_loads(capsys, doc):
    code, out, err = run(capsys, "compress", doc, "--rate", "0.5", "--model", "./no/such/dir", "--option", "bogus=1")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and "no option bogus" in err


def test_batch_options(capsys, tmp_path, doc, tiny_model_dir):
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text(json.dumps({"text": doc.read_text()}) + "\n")
    argv = ["batch", source, target, "--field", "text", "--rate", "0.5", "--model", tiny_model_dir, "--no-progress"]
    code, _, err = run(capsys, *argv, "--option", "bogus=1")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no option bogus" in err
    assert not target.exists() or target.read_text() == ""
    code, _, err = run(capsys, *argv, "--option", "stages=2", "--option", "consecutive=false")
    assert code == 0, err
    settings = json.loads(target.read_text())["settings"]
    assert settings["stages_run"] == 2 and settings["consecutive"] is False


@pytest.mark.parametrize("model", ["./no/such/dir", "no-such-org/no-such-model"])
def test_unknown_model_exit_1(capsys, doc, model):
    code, out, err = run(capsys, "compress", doc, "--rate", "0.5", "--model", model)
    assert code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and "model" in err


def test_console_script_no_traceback(tmp_path):
    """The installed entry point, in a fresh process: usage error and missing file."""
    exe = [sys.executable, "-m", "ctxpress.cli"]
    proc = subprocess.run([*exe, "compress", str(tmp_path / "missing.txt"), "--rate", "0.5"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    proc = subprocess.run([*exe, "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("ctxpress ")


GENERATE_KEYS = {"answer", "cache_bytes", "full_cache_bytes", "prefill_seconds", "compress_seconds",
                 "decode_tokens_per_second", "peak_memory_bytes", "method"}


@pytest.mark.parametrize("method", ["snapkv", "snapkv-words", "snapkv-tiered"])
def test_generate_json(capsys, doc, tiny_model_dir, method):
    code, out, err = run(capsys, "generate", "--context-file", doc, "--question", "What is dropped?",
                         "--kv", method, "--kv-ratio", "0.5", "--max-new-tokens", "5", "--model", tiny_model_dir,
                         "--json")
    assert code == 0, err
    result = json.loads(out)
    assert set(result) >= GENERATE_KEYS and result["method"] == method
    assert result["cache_bytes"] <= 0.5 * result["full_cache_bytes"]
    assert result["prefill_seconds"] > 0 and result["peak_memory_bytes"] > 0


def test_generate_one_token_has_no_decode_speed(capsys, doc, tiny_model_dir):
    code, out, err = run(capsys, "generate", "--context-file", doc, "--question", "Why?", "--kv", "snapkv",
                         "--max-new-tokens", "1", "--model", tiny_model_dir, "--json")
    assert code == 0, err
    assert json.loads(out)["decode_tokens_per_second"] is None  # one token: no interval to time


def test_generate_several_questions_one_cache(capsys, doc, tiny_model_dir):
    code, out, _ = run(capsys, "generate", "--context-file", doc, "--question", "Why?", "--question", "How?",
                       "--kv", "spindlekv", "--kv-option", "per_head=false", "--max-new-tokens", "3",
                       "--model", tiny_model_dir, "--json")
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(lines) == 2
    assert lines[0]["cache_bytes"] == lines[1]["cache_bytes"]
    # one compression serves both: the very same measured prefill and compression, not a second run
    assert lines[0]["prefill_seconds"] == lines[1]["prefill_seconds"]
    assert lines[0]["compress_seconds"] == lines[1]["compress_seconds"]
    assert lines[0]["settings"]["per_head"] is False


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--kv", "zip"], "invalid choice"),
        (["--kv-option", "window"], "KEY=VALUE"),
        (["--kv-option", "colour=red"], "colour"),
        (["--kv", "spindlekv", "--kv-option", "per_head=maybe"], "per_head must be true or false"),
        (["--kv-ratio", "0.000001"], "smallest"),
        (["--kv", "snapkv", "--kv-option", "window=abc"], "window must be an integer"),
        (["--kv", "snapkv", "--kv-option", "normalize=bogus"], "normalize must be one of"),
        (["--kv", "full", "--kv-ratio", "0.5"], "takes no budget"),
        # codebook-only SpindleKV checks every other option too (this was a ValueError traceback)
        (["--kv", "spindlekv", "--kv-option", "evict=false", "--kv-option", "normalize=bogus"],
         "normalize must be one of"),
        (["--kv", "spindlekv", "--kv-option", "evict=false", "--kv-ratio", "0.3"],
         "with evict=false keeps every token"),
        (["--kv-option", "unit=sentence"], "unit must be one of token, word"),
        (["--kv-ratio", "2"], "--kv-ratio"),
        (["--question-aware", "--question", "Again?"], "one question"),
    ],
)
def test_generate_bad_input(capsys, doc, tiny_model_dir, extra, needle):
    code, out, err = run(capsys, "generate", "--context-file", doc, "--question", "Why?", "--model",
                         tiny_model_dir, *extra)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and needle in err


def test_generate_empty_context(capsys, tmp_path, tiny_model_dir):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    code, _, err = run(capsys, "generate", "--context-file", empty, "--question", "Why?", "--model", tiny_model_dir)
    assert code == 2 and "empty" in err
