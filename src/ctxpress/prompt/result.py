"""What a compression returns."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class CompressionResult:
    """The compressed prompt and how it was obtained.

    Token counts are of the *context* (instruction and question are kept whole
    and not counted), in the compressor's tokenization without special tokens;
    ``kept_token_indices`` index into that tokenization.
    """

    compressed_text: str  # the compressed context
    compressed_prompt: str  # instruction + compressed context + question, ready to send
    kept_token_indices: list[int]
    origin_tokens: int
    compressed_tokens: int
    seconds: float
    method: str
    settings: dict = field(default_factory=dict)

    @property
    def rate(self) -> float:
        """Achieved fraction of context tokens kept."""
        return self.compressed_tokens / self.origin_tokens if self.origin_tokens else 1.0

    def to_dict(self) -> dict:
        out = asdict(self)
        out["rate"] = self.rate
        return out

    def to_llmlingua(self) -> dict:
        """The keys LLMLingua's ``compress_prompt`` returns (counts in this compressor's tokens)."""
        ratio = self.origin_tokens / max(1, self.compressed_tokens)
        return {
            "compressed_prompt": self.compressed_prompt,
            "origin_tokens": self.origin_tokens,
            "compressed_tokens": self.compressed_tokens,
            "ratio": f"{ratio:.1f}x",
            "rate": f"{100 * self.rate:.1f}%",
            "saving": f", saving {self.origin_tokens - self.compressed_tokens} tokens",
        }
