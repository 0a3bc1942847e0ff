"""Decoding state of one batch of requests, filled in by the layers that need it.

The loop in :mod:`vlm_bridge.inference.generate` knows no layer kind: it creates one
:class:`InferenceState`, hangs it on the structural :class:`~vlm_bridge.attention.mask.AttentionMask`
that every layer already receives, and advances ``start`` after each forward. Each layer keeps its own
piece under its own key:

* attention layers (:class:`~vlm_bridge.attention.core.TorchCoreAttention`) a :class:`KVCache` of
  keys with rotary applied; sliding-window layers slice it to their window;
* Mamba layers their conv inputs and SSM state (``MambaLayer``);

so a layer kind that arrives later brings generation by storing its own piece, not by changing the
loop. The state lives on the rank that owns the layer, so tensor and pipeline parallelism need
nothing extra.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class KVCache:
    """Keys and values ``[s, b, groups, head_dim]`` of one attention layer, preallocated for the
    whole generation so that decoding writes in place (no concatenation per token)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def extend(self, key: torch.Tensor, value: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``key``/``value`` at positions ``start..start+s`` and return every key/value so far."""
        end = start + key.shape[0]
        if self.keys is None:
            shape = (self.capacity, *key.shape[1:])
            self.keys = key.new_empty(shape)
            self.values = value.new_empty((self.capacity, *value.shape[1:]))
        if end > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions; {end} were asked for")
        self.keys[start:end] = key
        self.values[start:end] = value
        return self.keys[:end], self.values[:end]


class InferenceState:
    """Per-layer pieces of one generation, and how many positions they already hold.

    ``start`` is the number of positions cached before the current forward: 0 during prefill, then
    the prompt length plus the tokens decoded so far.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.start = 0
        self.pieces: dict = {}

    @property
    def prefilling(self) -> bool:
        return self.start == 0

    def piece(self, key, build: Callable[[], object]):
        """The piece a layer stored under ``key``, created by ``build()`` on first use."""
        if key not in self.pieces:
            self.pieces[key] = build()
        return self.pieces[key]

    def kv_cache(self, layer_number: int) -> KVCache:
        return self.piece(("kv", layer_number), lambda: KVCache(self.capacity))
