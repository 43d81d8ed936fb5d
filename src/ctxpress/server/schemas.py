"""The JSON bodies of the local routes, as pydantic parses them and the OpenAPI docs show them.

These check shapes and JSON types only; what a prompt-compression request
means and allows is :class:`ctxpress.request.PromptRequest`'s to decide.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..kv import DEFAULT_METHOD as DEFAULT_KV
from ..prompt.methods import DEFAULT_METHOD


class CompressBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    context: str | list[str]
    rate: float | None = None
    target_tokens: int | None = None
    method: str = DEFAULT_METHOD
    question: str = ""
    instruction: str = ""
    force_tokens: list[str] = Field(default_factory=list)
    options: dict[str, Any] = Field(default_factory=dict, description="method options, e.g. {'stages': 4}")


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class KVCompression(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: str = DEFAULT_KV
    ratio: float | None = None
    tokens: int | None = None
    options: dict[str, Any] = Field(default_factory=dict)


PROMPT_COMPRESSION_HELP = (
    "compress long messages first: rate or target_tokens, method, options, roles (default system, developer, "
    "user, tool), min_tokens (default 256: shorter messages are sent as they are); <ctxpress:keep> spans and "
    "the final question of the last user message are kept whole")


class ChatBody(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields (user, seed, ...) a local model ignores
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, description="0 or absent: greedy decoding")
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    prompt_compression: dict[str, Any] | None = Field(None, description=PROMPT_COMPRESSION_HELP)
    kv_compression: KVCompression | None = None


__all__ = ["ChatBody", "CompressBody", "KVCompression", "Message", "TextPart"]
