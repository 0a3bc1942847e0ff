"""The structural mask's predicates against a literal reference, and every backend against SDPA."""

from __future__ import annotations

import pytest
import torch

from vlm_bridge.attention.mask import AttentionMask


def reference(seg, span, causal, window, q_offset, sq, sk):
    """Literal per-pair rule: same segment, not padding, causal or same span, inside the window."""
    out = torch.zeros(seg.shape[0], sq, sk, dtype=torch.bool)
    for b in range(seg.shape[0]):
        for i in range(sq):
            q = i + q_offset
            for k in range(sk):
                if seg[b, q] < 0:
                    out[b, i, k] = q == k
                    continue
                ok = seg[b, q] == seg[b, k] and seg[b, k] >= 0
                in_span = span is not None and span[b, q] >= 0 and span[b, q] == span[b, k]
                ok = ok and (not causal or k <= q or in_span)
                ok = ok and (window is None or q - k < window)
                out[b, i, k] = ok
    return out


SEG = torch.tensor([[0, 0, 0, 0, 0, 0, 1, 1, 1, 1, -1, -1],
                    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]])
# Two images in the first sample (ids 0 and 1 apart), one in the second packed sample, one in row 2.
SPAN = torch.tensor([[-1, 0, 0, -1, 1, 1, -1, 2, 2, -1, -1, -1],
                     [-1, -1, 0, 0, 0, -1, -1, -1, -1, -1, -1, -1]])


@pytest.mark.parametrize("window", [None, 2, 3])
@pytest.mark.parametrize("with_span", [False, True])
def test_dense_mask_equals_the_literal_rule(window, with_span):
    span = SPAN if with_span else None
    mask = AttentionMask(segment_ids=SEG, span_ids=span, causal=True, window=window)
    assert torch.equal(mask.dense(12, 12, "cpu")[:, 0], reference(SEG, span, True, window, 0, 12, 12))


def test_span_and_window_each_change_the_mask():
    plain = AttentionMask(segment_ids=SEG).dense(12, 12, "cpu")
    spans = AttentionMask(segment_ids=SEG, span_ids=SPAN).dense(12, 12, "cpu")
    windowed = AttentionMask(segment_ids=SEG, window=2).dense(12, 12, "cpu")
    assert not torch.equal(plain, spans) and not torch.equal(plain, windowed)
    # a span never crosses a packed-sample boundary, even when ids repeat across samples
    assert not spans[0, 0, :6, 6:].any() and not spans[0, 0, 6:, :6].any()


def test_query_offset_gives_the_rows_of_the_full_mask():
    """Chunked prefill / decoding: queries 8..11 of 12 keys see what they see in the full mask."""
    full = AttentionMask(segment_ids=SEG, span_ids=SPAN, window=3).dense(12, 12, "cpu")
    block = AttentionMask(segment_ids=SEG, span_ids=SPAN, window=3, query_offset=8).dense(4, 12, "cpu")
    assert torch.equal(block, full[:, :, 8:])
    default = AttentionMask(segment_ids=SEG, span_ids=SPAN, window=3).dense(4, 12, "cpu")
    assert torch.equal(default, full[:, :, 8:])  # the last queries by default


def _attention(mask, backend, monkeypatch, window=None):
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from vlm_bridge.attention.core import TorchCoreAttention

    monkeypatch.setenv("VLM_BRIDGE_ATTENTION", backend)
    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                               kv_channels=8, tensor_model_parallel_size=1,
                               attention_dropout=0.0)
    import megatron.core.parallel_state as ps

    monkeypatch.setattr(ps, "get_tensor_model_parallel_world_size", lambda: 1)
    core = TorchCoreAttention(config, 1, AttnMaskType.causal, "self", softmax_scale=0.3, window=window)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(12, 2, 4, 8, generator=g)
    k, v = torch.randn(12, 2, 2, 8, generator=g), torch.randn(12, 2, 2, 8, generator=g)
    return core(q, k, v, mask)


@pytest.mark.parametrize("window", [None, 3])
def test_flex_attention_equals_dense_sdpa(window, monkeypatch):
    """FlexAttention (the GPU backend for spans and windows) computes exactly the dense mask."""
    mask = AttentionMask(segment_ids=SEG, span_ids=SPAN)
    dense = _attention(mask, "dense", monkeypatch, window)
    flex = _attention(AttentionMask(segment_ids=SEG, span_ids=SPAN), "flex", monkeypatch, window)
    real = SEG.T >= 0  # padding rows are defined differently by the two (never used)
    assert torch.allclose(flex[real], dense[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("window", [None, 130])
@pytest.mark.parametrize("sq_offset", [(300, None), (256, 44)])
def test_block_mask_equals_create_block_mask(window, sq_offset):
    """The broadcast-built BlockMask holds exactly the tensors ``create_block_mask`` builds from the
    same predicate: block counts, block order, full vs partial blocks, lengths not multiples of
    the 128 block, query offsets (context-parallel chunks)."""
    from torch.nn.attention.flex_attention import create_block_mask

    sq, offset = sq_offset
    sk = 300
    seg = torch.zeros(2, sk, dtype=torch.long)
    seg[0, 140:] = 1
    seg[0, 290:] = -1
    span = torch.full((2, sk), -1)
    span[0, 10:150], span[0, 200:260], span[1, 129:258] = 0, 1, 0
    mask = AttentionMask(segment_ids=seg, span_ids=span, causal=True, window=window,
                         query_offset=offset)
    ours = mask.block_mask(sq, sk, torch.device("cpu"), 4)
    start = mask.offset(sq, sk)
    theirs = create_block_mask(lambda b, h, q, k: mask.allowed(b, q + start, k), 2, None, sq, sk,
                               device="cpu")
    assert ours.seq_lengths == theirs.seq_lengths
    for a, b in zip(ours.as_tuple(flatten=False)[2:], theirs.as_tuple(flatten=False)[2:], strict=True):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert int(ours.kv_num_blocks.sum()) > 0  # partial blocks exist; full ones too without a window
    assert window is not None or int(ours.full_kv_num_blocks.sum()) > 0


@pytest.mark.parametrize("cu", [[0, 3, 7, 8], [0, 5]])
def test_varlen_bounds_known_at_construction_equal_the_derived_ones(cu):
    made = AttentionMask.from_cu_seqlens(torch.tensor(cu, dtype=torch.int32), causal=False)
    derived = AttentionMask(segment_ids=made.segment_ids.clone(), causal=False)
    (ours, longest), (theirs, their_longest) = made.cu_seqlens(torch.device("cpu")), derived.cu_seqlens(
        torch.device("cpu"))
    assert ours.tolist() == theirs.tolist() == cu and longest == their_longest


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_mask_moved_to_the_gpu_brings_its_varlen_bounds():
    packed = AttentionMask(segment_ids=torch.tensor([[0, 0, 1, 1, 1, 2, -1, -1]]), causal=True)
    moved = packed.to(torch.device("cuda"))
    gpu = moved.segment_ids.device
    cached, longest = moved._cache[("cu", str(gpu))]
    fresh = AttentionMask(segment_ids=moved.segment_ids.clone(), causal=True).cu_seqlens(gpu)
    assert cached.is_cuda and cached.tolist() == fresh[0].tolist() == [0, 2, 5, 6, 8] and longest == fresh[1]
