"""What a press, a compressed cache layer and a store promise each other.

Everything a new KV method must provide is in this module.

Calls go one way::

    Press.cache(model), or ``with press(model):``   a CompressedCache (cache.py); the
                                                     context manager's hooks are hooks.py's
    CompressedLayer (cache.py, the machinery)
        claims its layer's attention call          (an AttendingLayer of ctxpress.attention)
        during the first prefill, at every layer:  Press.score(...)
        after the last layer has been scored:       Press.compress(layers, model)   (once)
    Press (presses/, one policy per module)
        sizes a byte ratio by budget.py's search over what its stores would hold
        (each store's ``nbytes_for``, stores/)
        for each layer it compresses:               layer.compress_to(store)
    Store (stores/, one layout per module)
        from then on the layer delegates appends, attention, bytes and beam reordering to it.

A press never computes attention, checks masks or times itself; the layer
does, and imports only this module. A press that stores tensors differently
writes a new :class:`Store`; one that keeps tokens differently overrides
:meth:`Press.score` and :meth:`Press.compress` (most eviction presses only
``score``: see :class:`ctxpress.kv.presses.eviction.EvictionPress`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, ClassVar, Protocol

import torch

from ..attention import bottom_right_attention

if TYPE_CHECKING:
    from .cache import CompressedCache


class Store(ABC):
    """The tensors a compressed layer keeps, in a layout of the store's choosing.

    The layer hands :meth:`materialize`'s keys and values to transformers and
    gets them back in :meth:`attend`, so a store may return keys in any
    layout as long as its ``attend`` reads them consistently (SpindleKV's
    coded keys come back interleaved, and it masks columns per head).
    Nothing materialized is kept between steps: :meth:`nbytes` is what stays.
    """

    @abstractmethod
    def __len__(self) -> int:
        """Token columns stored: the key length that attention and its mask are sized by."""

    @property
    @abstractmethod
    def batch(self) -> int:
        """Prompts held (the batch size of the prefill)."""

    @abstractmethod
    def append(self, keys: torch.Tensor, values: torch.Tensor, position: int) -> None:
        """Add new tokens' post-RoPE (b, kv_heads, n, d) keys and values, the first at sequence ``position``."""

    @abstractmethod
    def materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values to attend over, (b, kv_heads, len(self), d); built on demand, never kept."""

    def write_into(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write :meth:`materialize`'s tensors into the given slices (of a larger cache being assembled).

        For stores in the plain layout (every head attends to every column, keys as transformers
        gives them), whose tensors can be joined with others'. A store that decodes its tensors
        (low-bit codes) overrides this to decode in place.
        """
        materialized = self.materialize()
        keys.copy_(materialized[0])
        values.copy_(materialized[1])

    def attend(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float) -> torch.Tensor:
        """Attention output (b, q, heads, d) of ``query`` (b, heads, q, d) over :meth:`materialize`'s tensors.

        The queries are the last tokens of the sequence (bottom-right causal
        alignment). The default is plain attention over every stored column.
        """
        return bottom_right_attention(query, keys, values, scaling, None)

    def attended_tokens(self) -> float:
        """Stored tokens one head attends to, averaged over heads."""
        return float(len(self))

    @abstractmethod
    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Reorder the batch for beam search (a store that cannot, refuses with an InputError)."""

    @abstractmethod
    def nbytes(self) -> int:
        """Bytes held now, every tensor the store keeps included."""


class PrefilledLayer(Protocol):
    """What a press sees of one layer when it compresses (a :class:`ctxpress.kv.cache.CompressedLayer`)."""

    layer_idx: int
    seen: int  # prompt tokens
    keys: torch.Tensor  # (b, kv_heads, n, d), post-RoPE, as the prefill left them
    values: torch.Tensor
    scores: torch.Tensor | None  # what Press.score returned for this layer
    units: torch.Tensor | None  # word index of every prompt token, (n,) or (b, n), where the press needs words

    def compress_to(self, store: Store) -> None:
        """Replace the layer's dense tensors by ``store`` (a layer left alone stays dense)."""


class Press(ABC):
    """A KV-cache compression policy: how to score prompt tokens, what to keep and how to store it.

    Presses are dataclasses whose fields are their options (see
    :mod:`ctxpress.options`); a bad option is refused when the press is made.
    The registry, generation and the shared prefill use a press through this
    class alone.
    """

    name: ClassVar[str]
    needs_column_sums: ClassVar[bool] = False  # ask the layer for attention received per key (H2O)

    @classmethod
    @abstractmethod
    def takes_budget(cls, options: Mapping[str, object]) -> bool:
        """Whether a press of this class made with ``options`` needs a ratio or token budget.

        A press that keeps every token (``full``, codebook-only SpindleKV)
        refuses a budget instead of ignoring it; entry points add a default
        budget only where this is true.
        """

    def needs_words(self) -> str | None:
        """None, or how :meth:`compress` wants ``layer.units`` made: the cache's owner, who knows the
        token ids, must then give the word of every prompt token, ``token_words(tokenizer, ids, punctuation)``
        with the returned ``punctuation`` (:func:`ctxpress.words.token_words`)."""
        return None

    @abstractmethod
    def cache(self, model: torch.nn.Module, units: torch.Tensor | None = None) -> CompressedCache:
        """A cache that this press compresses after its first prefill (most presses:
        ``ctxpress.kv.cache.compressed_cache(self, model, units)``).

        ``units``: the word of every prompt token, given when :meth:`needs_words` is not None.
        """

    @abstractmethod
    def settings(self) -> dict:
        """The options as set (None left out), for results and reports."""

    @abstractmethod
    def score(self, query: torch.Tensor, key: torch.Tensor, scaling: float,
              columns: torch.Tensor | None) -> torch.Tensor | None:
        """Importance of every prompt token at one layer, (b, heads, n); None if the press needs none.

        ``query`` (b, heads, n, d) and ``key`` (b, kv_heads, n, d) are post-RoPE;
        ``columns`` is the attention each key received, summed over queries,
        (b, heads, n), when :attr:`needs_column_sums` is set.
        """

    @abstractmethod
    def compress(self, layers: Sequence[PrefilledLayer], model: torch.nn.Module) -> None:
        """Choose what each layer keeps and hand it a :class:`Store`; ``layers`` are in layer order."""


__all__ = ["PrefilledLayer", "Press", "Store"]
