"""Scores and likelihood-based measures."""

from __future__ import annotations

import re
import string

import torch


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD / Lost in the Middle)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def best_subspan_em(prediction: str, answers: list[str]) -> float:
    """1.0 if any normalised gold answer occurs in the normalised prediction."""
    pred = normalize_answer(prediction)
    return float(any(normalize_answer(a) and normalize_answer(a) in pred for a in answers))


def answer_survives(context: str, answers: list[str]) -> float:
    """1.0 if any normalised gold answer occurs in the normalised ``context`` (no model needed)."""
    text = normalize_answer(context)
    return float(any(normalize_answer(a) and normalize_answer(a) in text for a in answers))


def contains_exactly(prediction: str, answers: list[str]) -> float:
    """1.0 if any answer string occurs verbatim in the prediction."""
    return float(any(a in prediction for a in answers))


def mean_nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean negative log-likelihood of ``targets`` (n,) under ``logits`` (n, vocab)."""
    return float(torch.nn.functional.cross_entropy(logits.float(), targets.to(logits.device)))


def mean_kl(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Mean over rows of KL(reference || other) between next-token distributions."""
    ref = torch.log_softmax(reference.float(), -1)
    oth = torch.log_softmax(other.float(), -1)
    return float((ref.exp() * (ref - oth)).sum(-1).mean())
