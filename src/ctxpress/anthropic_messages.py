"""An Anthropic Messages API request under a :class:`~ctxpress.request.PromptRequest`: which texts are compressed.

The same policy as OpenAI's chat (:mod:`ctxpress.messages`), walked over
Anthropic's shapes, each text handed to :meth:`Shrinker.text
<ctxpress.messages.Shrinker.text>`:

* ``system`` (a string, or a list of text blocks) under the role ``system``;
* a message's ``content`` (a string, or a list of blocks) under its own role
  (``user``, ``assistant``); the last text block of every user message ends
  with the question (``question=True``);
* the text of a ``tool_result`` block (its ``content``, a string or a list of
  blocks) as a tool's output (``tool=True``), under the role ``tool``, as
  OpenAI's ``role: tool`` messages are;
* every other block (``image``, ``document``, ``tool_use``, ``thinking``...)
  and every other field (``cache_control`` included) exactly as it came.

A message's compressed form depends on its own content, role and the policy
only, so the history of turn N is a prefix of turn N+1's and a provider's
prompt cache keeps matching it.
"""

from __future__ import annotations

from .errors import InputError
from .messages import Shrinker, Tally
from .request import PromptRequest


class AnthropicWalker:
    """Applies the message policy to a Messages API request body with one :class:`Shrinker`."""

    def __init__(self, shrinker: Shrinker, policy: PromptRequest, tally: Tally) -> None:
        self.shrinker, self.policy, self.tally = shrinker, policy, tally

    def request(self, body: dict) -> dict:
        """``body`` with ``system`` and ``messages`` compressed, every other field as it came."""
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise InputError("messages must be a non-empty list")
        if not all(isinstance(message, dict) for message in messages):
            raise InputError("every message must be an object with a role")
        out = {**body, "system": self.system(body["system"])} if "system" in body else dict(body)
        out["messages"] = [self.message(message) for message in messages]
        return out

    def system(self, system: object) -> object:
        if isinstance(system, str):
            return self._text(system, "system")
        if isinstance(system, list):
            return self.blocks(system, "system")
        raise InputError("system must be a string or a list of text blocks")

    def message(self, message: dict) -> dict:
        role, content = message.get("role"), message.get("content")
        if isinstance(content, str):
            return {**message, "content": self._text(content, role, question=role == "user")}
        if isinstance(content, list):
            return {**message, "content": self.blocks(content, role, question=role == "user")}
        return message  # not a shape this walker knows: the upstream judges it

    def blocks(self, blocks: list, role: object, question: bool = False, tool: bool = False) -> list:
        """Text blocks compressed (the last one ending with the question if ``question``), tool results'
        texts as tool output, every other block as it came."""
        texts = [i for i, block in enumerate(blocks) if _is_text(block)]
        out = list(blocks)
        for i, block in enumerate(blocks):
            if i in texts:
                out[i] = {**block, "text": self._text(block["text"], role, question and i == texts[-1], tool)}
            elif isinstance(block, dict) and block.get("type") == "tool_result":
                out[i] = self.tool_result(block)
        return out

    def tool_result(self, block: dict) -> dict:
        content = block.get("content")
        if isinstance(content, str):
            return {**block, "content": self._text(content, "tool", tool=True)}
        if isinstance(content, list):
            return {**block, "content": self.blocks(content, "tool", tool=True)}
        return block

    def _text(self, text: str, role: object, question: bool = False, tool: bool = False) -> str:
        eligible = role in self.policy.roles
        return self.shrinker.text(text, self.policy, self.tally, eligible, question=question, tool=tool)


def _is_text(block: object) -> bool:
    return isinstance(block, dict) and block.get("type") == "text" and isinstance(block.get("text"), str)


__all__ = ["AnthropicWalker"]
