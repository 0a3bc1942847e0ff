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

For CUDA-graph decoding (:mod:`vlm_bridge.inference.graphs`) the state turns *static*: every
shape and address stays fixed from one step to the next. The write position is a device tensor,
attention reads the whole preallocated cache, and a ``[b, capacity]`` mask of written, non-padding
keys (plus the window of sliding layers) says which keys count; pieces are updated in place.
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

    def extend(self, key: torch.Tensor, value: torch.Tensor,
               state: InferenceState) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``key``/``value`` at the state's write position and return every key/value so far
        (static state: the whole cache, its mask says which keys count)."""
        if state.write_index is not None:
            self.keys.index_copy_(0, state.write_index, key)
            self.values.index_copy_(0, state.write_index, value)
            return self.keys, self.values
        start = state.start
        end = start + key.shape[0]
        if self.keys is None:
            shape = (self.capacity, *key.shape[1:])
            # Zeros, not garbage: masked-out keys still enter the attention matmul with weight 0
            # when decoding reads the whole cache, and 0 * NaN would poison the row.
            self.keys = key.new_zeros(shape)
            self.values = value.new_zeros((self.capacity, *value.shape[1:]))
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
        # Static (CUDA-graph) decoding: where the new token goes, which keys count.
        self.write_index: torch.Tensor | None = None  # [1] long
        self.valid: torch.Tensor | None = None  # [b, capacity] bool
        self._key_index: torch.Tensor | None = None

    def make_static(self, valid_prompt: torch.Tensor) -> None:
        """Switch to static decoding after a prefill of ``valid_prompt`` (``[b, prompt]`` bool,
        False on padding)."""
        rows, prompt = valid_prompt.shape
        device = valid_prompt.device
        self.valid = torch.zeros(rows, self.capacity, dtype=torch.bool, device=device)
        self.valid[:, :prompt] = valid_prompt
        self.write_index = torch.zeros(1, dtype=torch.long, device=device)
        self._key_index = torch.arange(self.capacity, device=device)

    def advance_static(self) -> None:
        """Before a static step: the new token is written at ``start`` and counts from now on."""
        self.write_index.fill_(self.start)
        self.valid[:, self.start] = True

    def static_mask(self, window: int | None) -> torch.Tensor | None:
        """``[b, 1, 1, capacity]`` keys the newest token may see (SDPA convention), or None when
        the state is not static. Built inside the graph from the static tensors."""
        if self.valid is None:
            return None
        keep = self.valid
        if window is not None:
            keep = keep & (self._key_index > self.write_index - window)
        return keep[:, None, None, :]

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
