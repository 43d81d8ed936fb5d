"""Chat prompts as the target model reads them: one rendering for the server, generation and the bench.

With a chat template the tokenizer's own template renders the messages;
without one, a plain ``role: content`` transcript ending in ``assistant:``.
"""

from __future__ import annotations

import torch

SPLIT = "\n\n"  # between the context and the question inside the user message
_MARKER = "\u2063CTXPRESS\u2063"  # invisible separator no template alters: where the question part starts


def _templated(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render(tokenizer, messages: list[dict]) -> str:
    """The prompt text of ``messages`` (``role``/``content`` dicts), ready for the assistant's turn."""
    if _templated(tokenizer):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role']}: {m['content']}{SPLIT}" for m in messages) + "assistant:"


def _ids(tokenizer, text: str, first: bool) -> torch.Tensor:
    # a template writes its own special tokens; plain text gets the tokenizer's (BOS) at the start only
    special = first and not _templated(tokenizer)
    return tokenizer(text, add_special_tokens=special, return_tensors="pt").input_ids


def chat_ids(tokenizer, messages: list[dict]) -> torch.Tensor:
    """Token ids (1, n) of the rendered chat."""
    return _ids(tokenizer, render(tokenizer, messages), first=True)


def prompt_ids(tokenizer, context: str, question: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of a one-message chat ``context + "\\n\\n" + question``, split into (context part, question part).

    The first part is a prefix of the full prompt that does not depend on the
    question, so its (compressed) cache can serve any question.
    """
    head, tail = render(tokenizer, [{"role": "user", "content": context + _MARKER + SPLIT + question}]).split(_MARKER)
    return _ids(tokenizer, head, first=True), _ids(tokenizer, tail, first=False)


def question_ids(tokenizer, question: str) -> torch.Tensor:
    """The question part of :func:`prompt_ids`, which does not depend on the context."""
    return prompt_ids(tokenizer, "", question)[1]


__all__ = ["SPLIT", "chat_ids", "prompt_ids", "question_ids", "render"]
