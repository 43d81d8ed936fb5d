"""Prompt compression: DAC, its whole-word default, and the baselines they are compared with."""

from .compressor import PromptCompressor
from .methods import DEFAULT_METHOD, METHODS, method_names
from .result import CompressionResult

__all__ = ["DEFAULT_METHOD", "METHODS", "CompressionResult", "PromptCompressor", "method_names"]
