"""The structural attention mask shared by every layer of one forward pass, and its predicates.

A mask is described, not materialised: which tokens belong to which segment (a packed document, an
image, a ViT window; negative ids are padding), whether attention is causal, which tokens form
bidirectional spans inside a causal sequence (the soft tokens of one image), an
optional one-sided sliding window, and the offset of the queries into the keys (chunked prefill,
decoding). Each backend builds what it needs from the same small predicates:

    allowed(q, k) = same_segment(q, k) and not padding(k)
                    and (causal(q, k) or same_span(q, k))
                    and in_window(q, k)

with positions ``q`` counted from ``query_offset`` so that a query block of a longer key sequence
sees exactly what the full sequence would. The window is the one transformers 5.24 applies to
sliding-window layers: key ``k`` is visible from query ``q`` when ``q - k < window``, applied on
top of the causal-or-span rule (so an image block stays whole only inside the window).

A padding query attends to itself only, so that softmax never sees an all-masked row.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from vlm_bridge.parallel import host_to_device


@dataclass
class AttentionMask:
    """Structural attention mask (see the module docstring).

    segment_ids: ``[b, s_k]`` int; tokens attend only within their own segment. Negative ids mark
        padding. ``None`` means one segment per row and no padding.
    causal: whether a token may not attend to later tokens (outside its span).
    span_ids: ``[b, s_k]`` int; tokens sharing a non-negative id attend to each other both ways
        even in a causal mask (image soft tokens). ``None`` or negative: no span.
    window: sliding window size (``q - k < window``), or ``None`` for global attention.
    state: the decoding state of a generation (KV cache, Mamba state), carried to every layer with
        the mask; ``None`` outside generation.
    query_offset: position of the first query among the keys (queries are the last ``s_q``
        positions when equal to ``s_k - s_q``, the default when ``None``).
    """

    segment_ids: torch.Tensor | None = None
    causal: bool = True
    span_ids: torch.Tensor | None = None
    window: int | None = None
    query_offset: int | None = None
    # Decoding state (vlm_bridge.inference.state.InferenceState) the layers fill in, or None.
    state: object | None = field(default=None, compare=False)
    # Context parallelism (vlm_bridge.attention.context.ContextSplit): this rank holds two query
    # chunks of the sequence the ids above describe; None without CP.
    context: object | None = field(default=None, compare=False)
    # Built once per forward and reused by every layer (a ViT has 32 of them).
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor, causal: bool) -> AttentionMask:
        """Block-diagonal mask for one packed row whose segments end at ``cu_seqlens[1:]``."""
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        total = int(cu_seqlens[-1]) if len(cu_seqlens) else 0
        ids = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths,
                                      output_size=total)
        mask = cls(segment_ids=ids[None], causal=causal)
        if bool((lengths > 0).all()):  # what cu_seqlens() would derive from the ids, known already
            longest = int(lengths.max()) if len(lengths) else 0
            mask._cache[("cu", str(cu_seqlens.device))] = (cu_seqlens.to(torch.int32), longest)
        return mask

    @classmethod
    def from_padding(cls, attention_mask: torch.Tensor | None) -> AttentionMask:
        """Causal mask for a padded batch (HF ``attention_mask``: 1 = token, 0 = padding)."""
        if attention_mask is None or bool(attention_mask.all()):
            return cls(segment_ids=None, causal=True)
        return cls(segment_ids=torch.where(attention_mask.bool(), 0, -1), causal=True)

    def for_queries(self, offset: int) -> AttentionMask:
        """The same mask for a block of queries starting at global position ``offset`` (a
        context-parallel chunk); cached per offset."""
        key = ("queries", offset)
        if key not in self._cache:
            self._cache[key] = dataclasses.replace(self, query_offset=offset, context=None, _cache={})
        return self._cache[key]

    def with_window(self, window: int | None) -> AttentionMask:
        """The same mask with a sliding window; cached, so every sliding layer shares one."""
        if window == self.window:
            return self
        key = ("window", window)
        if key not in self._cache:
            self._cache[key] = dataclasses.replace(self, window=window, _cache={})
        return self._cache[key]

    def cached(self, key, build):
        """``build()`` once per mask: what every layer of one forward derives from it alike."""
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def to(self, device) -> AttentionMask:
        """The mask on ``device``. Moving from the host to a GPU, the varlen boundaries are worked
        out on the host first and copied asynchronously: derived on the GPU, they cost three
        host-device synchronisations per mask (the GPU idles while the host catches up)."""
        device = torch.device(device)
        source = next((t.device for t in (self.segment_ids, self.span_ids) if t is not None), None)
        to_gpu = source is not None and source.type == "cpu" and device.type == "cuda"

        def move(t):
            return host_to_device(t, device) if t is not None else None

        moved = dataclasses.replace(self, segment_ids=move(self.segment_ids), span_ids=move(self.span_ids),
                                    _cache={})
        if to_gpu:
            cu = self.cu_seqlens(source)
            if cu is not None:
                if device.index is None:
                    device = torch.device("cuda", torch.cuda.current_device())
                moved._cache[("cu", str(device))] = (move(cu[0]), cu[1])
        return moved

    # ---- what backends ask -------------------------------------------------------------------
    def is_plain(self) -> bool:
        """Plain causal or full attention over whole rows: SDPA needs no mask at all."""
        return self.segment_ids is None and self.span_ids is None and self.window is None

    def needs_dense(self) -> bool:
        return not self.is_plain()

    def offset(self, sq: int, sk: int) -> int:
        return sk - sq if self.query_offset is None else self.query_offset

    def allowed(self, b, q, k):
        """The predicate on index tensors (broadcastable): True where query q may see key k.

        ``b`` indexes the batch of ``segment_ids`` / ``span_ids``; ``q`` is already offset.
        """
        ok = (q >= 0) & (k >= 0)  # all true: the index shapes broadcast to the mask's
        if self.causal:
            order = k <= q
            if self.span_ids is not None:
                spans = self.span_ids
                order = order | ((spans[b, q] == spans[b, k]) & (spans[b, k] >= 0))
            ok = ok & order
        if self.window is not None:
            ok = ok & (q - k < self.window)
        if self.segment_ids is not None:
            ids = self.segment_ids
            ok = ok & (ids[b, q] == ids[b, k]) & (ids[b, k] >= 0)
            ok = ok | ((ids[b, q] < 0) & (q == k))  # padding attends to itself
        return ok

    def dense(self, sq: int, sk: int, device: torch.device) -> torch.Tensor | None:
        """Boolean ``[b|1, 1, sq, sk]`` mask, True where attention is allowed (SDPA convention);
        None for plain full attention."""
        key = ("dense", sq, sk, str(device))
        if key not in self._cache:
            self._cache[key] = self._build_dense(sq, sk, torch.device(device))
        return self._cache[key]

    def _build_dense(self, sq: int, sk: int, device: torch.device) -> torch.Tensor | None:
        if self.is_plain() and not self.causal:
            return None
        moved = self.to(device)
        rows = 1
        for ids in (moved.segment_ids, moved.span_ids):
            if ids is not None:
                rows = ids.shape[0]
        b = torch.arange(rows, device=device)[:, None, None]
        q = torch.arange(sq, device=device)[None, :, None] + self.offset(sq, sk)
        k = torch.arange(sk, device=device)[None, None, :]
        return moved.allowed(b, q, k)[:, None]

    def cu_seqlens(self, device: torch.device) -> tuple[torch.Tensor, int] | None:
        """``(cu_seqlens int32, max_len)`` when this is one row of contiguous segments with no
        spans, windows or offsets (what varlen flash attention computes), else None.

        Padding (id -1) forms segments of its own, which is harmless: padded positions never
        carry loss and nothing real attends to them.
        """
        key = ("cu", str(device))
        if key not in self._cache:
            self._cache[key] = None
            ids = self.segment_ids
            simple = self.span_ids is None and self.window is None and not self.query_offset
            if simple and ids is not None and ids.shape[0] == 1:
                ids = ids[0]
                change = torch.nonzero(ids[1:] != ids[:-1]).flatten() + 1
                bounds = torch.cat([change.new_zeros(1), change, change.new_tensor([ids.numel()])])
                starts = ids[bounds[:-1]]
                real = starts[starts >= 0]
                if real.unique().numel() == real.numel():  # every segment is one contiguous run
                    lengths = bounds[1:] - bounds[:-1]
                    self._cache[key] = (bounds.to(device, torch.int32), int(lengths.max()))
        return self._cache[key]

    def block_mask(self, sq: int, sk: int, device: torch.device, heads: int):
        """A FlexAttention ``BlockMask`` from the same predicate (GPU kernels skip empty blocks).

        ``create_block_mask`` would evaluate the predicate under four nested ``vmap`` levels,
        whose gathers cost milliseconds of host time each (about 50 ms per 4,096-token micro-batch
        with image spans and windows, while the GPU waits); the dense mask is built by
        broadcasting instead and reduced to blocks exactly as ``create_block_mask`` does.
        """
        key = ("block", sq, sk, str(device))
        if key not in self._cache:
            moved = self.to(device)
            offset = self.offset(sq, sk)
            rows = next((t.shape[0] for t in (moved.segment_ids, moved.span_ids) if t is not None), 1)

            def mask_mod(b, h, q, k):
                return moved.allowed(b if rows > 1 else b * 0, q + offset, k)

            dense = moved._build_dense(sq, sk, torch.device(device))  # moved: no second copy
            if dense is None:  # full attention: every position allowed
                dense = torch.ones(1, 1, sq, sk, dtype=torch.bool, device=device)
            self._cache[key] = block_mask_from_dense(dense, mask_mod)
        return self._cache[key]


def _ordered(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query block: how many key blocks are set, and their indices first (stable order)."""
    blocks = blocks.to(torch.int32)
    order = torch.argsort(blocks, dim=-1, descending=True, stable=True)
    return blocks.sum(-1, dtype=torch.int32), order.to(torch.int32)


def block_mask_from_dense(dense: torch.Tensor, mask_mod, block: int = 128):
    """``BlockMask`` of a boolean ``[b, 1, sq, sk]`` mask: key blocks wholly allowed are "full"
    (no predicate in the kernel), partly allowed ones "partial" (``mask_mod`` decides), the rest
    skipped; the same tensors ``create_block_mask`` produces."""
    from torch.nn.attention.flex_attention import BlockMask

    b, _, sq, sk = dense.shape
    nq, nk = -(-sq // block), -(-sk // block)
    padded = torch.nn.functional.pad(dense, (0, nk * block - sk, 0, nq * block - sq))
    counts = padded.view(b, 1, nq, block, nk, block).sum(dim=(3, 5))
    full = counts == block * block
    partial = (counts > 0) & ~full
    return BlockMask.from_kv_blocks(*_ordered(partial), *_ordered(full), BLOCK_SIZE=(block, block),
                                    mask_mod=mask_mod, seq_lengths=(sq, sk))
