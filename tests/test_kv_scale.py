"""benchmarks/kv_scale.py on the CPU with its tiny shape: the numbers it reports obey the byte budget,
and a mistyped method is refused with a message before any model is built."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "kv_scale.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--shape", "tiny", "--device", "cpu", "--dtype", "float32",
                           *args], capture_output=True, text=True, timeout=300)


def test_scale_benchmark_reports_every_method_within_its_budget(tmp_path):
    out = tmp_path / "scale.jsonl"
    proc = run("--tokens", "96", "--ratios", "0.25", "--methods", "snapkv,snapkv-words,quantized",
               "--steps", "2", "--rounds", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["method"] for r in results] == ["full", "snapkv", "snapkv-words", "quantized"]
    full, *compressed = results
    assert full["stored_bytes"] == full["dense_bytes"] and full["decode_vs_full"] == 1
    for r in compressed:
        assert 0 < r["stored_bytes"] <= 0.25 * r["dense_bytes"], r
        assert r["decode_tokens_per_second"] > 0
    assert proc.stdout.count("\n| 96 |") == 4  # the markdown table: one row per method


def test_scale_benchmark_refuses_an_unknown_method():
    proc = run("--methods", "snapkv,nosuchpress")
    assert proc.returncode != 0
    assert "nosuchpress" in proc.stderr and "Traceback" not in proc.stderr
