"""ctxpress: cheaper long-context LLM inference.

* Prompt compression (DAC): :class:`PromptCompressor`.
* Model loading (embedded SmolLM2-135M or any transformers causal LM):
  :func:`load_model`.
"""

from .errors import CtxpressError, InputError, ModelLoadError
from .models import DEFAULT_MODEL, load_model
from .prompt import METHODS, CompressionResult, PromptCompressor

__all__ = [
    "DEFAULT_MODEL",
    "METHODS",
    "CompressionResult",
    "CtxpressError",
    "InputError",
    "ModelLoadError",
    "PromptCompressor",
    "load_model",
]
__version__ = "0.1.0"
