"""Prompt compression: DAC and the baselines it is compared with."""

from .compressor import PromptCompressor
from .methods import METHODS, method_names
from .result import CompressionResult

__all__ = ["METHODS", "CompressionResult", "PromptCompressor", "method_names"]
