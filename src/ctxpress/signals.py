"""Per-token signals from one forward pass of a causal LM.

For a token sequence ``x`` the compressor needs, per token ``t``:

* self-information ``I_t = -log p(x_t | x_<t)`` (token 0 has none: NaN), and
* received attention ``s_t``: the attention probability that key ``t``
  receives, summed over all layers, heads and query rows ``i >= t``, divided
  by the number of (layer, head) maps.

Both come from a single forward pass in O(n) extra memory: attention through
:class:`~ctxpress.attention.ColumnSumProbe` (one block of one layer at a
time), self-information from the final hidden states, projected to the
vocabulary a few hundred rows at a time instead of as one ``n x vocab``
logits tensor. :func:`reference_signals` is the direct definition
(``output_attentions=True``), kept for tests and benchmarks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .attention import ColumnSumProbe, attention_implementation, probing

LOGIT_ROWS = 512  # rows of the vocabulary projection computed at once


@dataclass
class TokenSignals:
    """Signals of one sequence; both tensors are float32 of the sequence length."""

    self_information: torch.Tensor
    attention: torch.Tensor | None


def _final_logits(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Vocabulary logits of ``hidden`` the way the model's own head computes them."""
    logits = model.get_output_embeddings()(hidden).float()
    cfg = model.config
    if getattr(cfg, "logit_scale", None) is not None:  # Cohere
        logits = logits * cfg.logit_scale
    if getattr(cfg, "logits_scaling", None) is not None:  # Granite
        logits = logits / cfg.logits_scaling
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap is not None:  # Gemma 2/3
        logits = torch.tanh(logits / cap) * cap
    return logits


def _self_information(model: torch.nn.Module, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``-log p(ids[t] | ids[:t])`` for one sequence; position 0 is NaN."""
    n = ids.shape[0]
    info = torch.full((n,), float("nan"), dtype=torch.float32, device=ids.device)
    for start in range(0, n - 1, LOGIT_ROWS):
        stop = min(n - 1, start + LOGIT_ROWS)
        logits = _final_logits(model, hidden[start:stop])
        target = ids[start + 1 : stop + 1]
        info[start + 1 : stop + 1] = torch.logsumexp(logits, -1) - logits.gather(
            -1, target[:, None]
        ).squeeze(-1)
    return info


def pad_right(sequences: Sequence[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack 1-D id tensors into (b, n_max), padding on the right; also return lengths."""
    lengths = torch.tensor([len(s) for s in sequences])
    batch = torch.full((len(sequences), int(lengths.max())), pad_id, dtype=torch.long)
    for row, seq in enumerate(sequences):
        batch[row, : len(seq)] = seq
    return batch, lengths


@torch.no_grad()
def token_signals(
    model: torch.nn.Module,
    sequences: Sequence[torch.Tensor],
    *,
    attention: bool = True,
    block_size: int = 128,
    last_rows: Sequence[int] | None = None,
) -> list[TokenSignals]:
    """Signals for a batch of token sequences, from one forward pass.

    Sequences are right-padded: under causal attention a real token never sees
    the padding after it, so every sequence gets exactly the numbers it would
    get alone, and padded query rows are left out of the attention sums. With
    ``attention=False`` only self-information is computed (plain SDPA pass).
    ``last_rows``: per sequence, count only the attention paid by its last
    that many query rows (a question after the context); None: all rows.
    """
    device = next(model.parameters()).device
    ids, lengths = pad_right(sequences)
    ids = ids.to(device)
    base = model.base_model
    if attention:
        rows = torch.arange(ids.shape[1])[None, :]
        row_mask = rows < lengths[:, None]
        if last_rows is not None:
            row_mask &= rows >= (lengths - torch.tensor(list(last_rows)))[:, None]
        masked = len(sequences) > 1 or last_rows is not None
        probe = ColumnSumProbe(row_mask.to(device) if masked else None, block_size)
        with probing(model, probe):
            hidden = base(input_ids=ids, use_cache=False).last_hidden_state
        attn = probe.totals / probe.matrices
    else:
        hidden = base(input_ids=ids, use_cache=False).last_hidden_state
        attn = None
    out = []
    for row, n in enumerate(lengths.tolist()):
        info = _self_information(model, hidden[row, :n], ids[row, :n])
        out.append(TokenSignals(info.cpu(), None if attn is None else attn[row, :n].cpu()))
    return out


@torch.no_grad()
def reference_signals(model: torch.nn.Module, ids: torch.Tensor) -> TokenSignals:
    """The direct definition: all attention maps at once, full logits.

    This is what the DAC reference code computes. Memory grows with
    ``layers * heads * n^2``; use it only as ground truth.
    """
    ids = ids.to(next(model.parameters()).device)[None, :]
    with attention_implementation(model, "eager"):
        out = model(input_ids=ids, output_attentions=True, use_cache=False)
    logits = out.logits[0, :-1].float()
    info = torch.full((ids.shape[1],), float("nan"))
    info[1:] = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none").cpu()
    maps = torch.cat([a[0].float() for a in out.attentions])  # (layers*heads, n, n)
    attn = maps.sum(dim=(0, 1)) / maps.shape[0]
    return TokenSignals(info, attn.cpu())


def batched_signals(
    model: torch.nn.Module,
    sequences: Sequence[torch.Tensor],
    *,
    attention: bool = True,
    batch_tokens: int = 4096,
    on_batch=None,
    last_rows: Sequence[int] | None = None,
) -> list[TokenSignals]:
    """:func:`token_signals` over many sequences, in length-sorted batches.

    Sequences of similar length are grouped so that a batch holds at most
    ``batch_tokens`` tokens including padding (a longer sequence runs alone).
    ``on_batch(tokens)`` is called after each batch, for progress bars;
    ``last_rows`` is passed on (per sequence) as in :func:`token_signals`.
    """
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    results: list[TokenSignals | None] = [None] * len(sequences)
    batch: list[int] = []

    def flush() -> None:
        if not batch:
            return
        rows = None if last_rows is None else [last_rows[i] for i in batch]
        for i, sig in zip(batch, token_signals(model, [sequences[i] for i in batch], attention=attention,
                                               last_rows=rows)):
            results[i] = sig
        if on_batch is not None:
            on_batch(sum(len(sequences[i]) for i in batch))
        batch.clear()

    for i in order:
        # sorted ascending, so the newest sequence is the longest of the batch
        if batch and len(sequences[i]) * (len(batch) + 1) > batch_tokens:
            flush()
        batch.append(i)
    flush()
    return results  # type: ignore[return-value]
