"""Prompt compression: DAC, its whole-word default, and the baselines they are compared with."""

from .compressor import PromptCompressor
from .methods import DEFAULT_METHOD, METHODS, PassageMethod, RelevanceMethod, method_names
from .result import CompressionResult

__all__ = ["DEFAULT_METHOD", "METHODS", "CompressionResult", "PassageMethod", "PromptCompressor", "RelevanceMethod",
           "method_names"]
