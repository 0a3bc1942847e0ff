"""The fused norm and gated activation on a GPU, both kernel paths (``torch.compile``'s generated
kernels and the hand-written ones of ``fused_triton``) against the eager bodies: values and
gradients, fp32 and bf16, at two token counts. In bf16 each path is also measured against the fp32
computation on the same inputs: its RMS error may not exceed the eager code's by more than a
quarter."""

from __future__ import annotations

import pytest
import torch

from vlm_bridge.families._common import fused, fused_triton

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _run(fn, tensors, upstream):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    out.backward(upstream.to(out.dtype))
    return [out.detach().float()] + [t.grad.float() for t in leaves]


def _rms(values, reference):
    return [float((v - r).pow(2).mean().sqrt()) for v, r in zip(values, reference, strict=True)]


def _compare(fused_fn, eager_fn, tensors, dtype):
    upstream = torch.randn_like(eager_fn(*tensors).float()).to(torch.bfloat16)
    got, want = _run(fused_fn, tensors, upstream), _run(eager_fn, tensors, upstream)
    tol = 1e-5 if dtype == torch.float32 else 3e-2  # bf16: a few steps where roundings differ
    for g, w in zip(got, want, strict=True):
        scale = float(w.abs().max())
        assert float((g - w).abs().max()) <= tol * max(scale, 1.0), (float((g - w).abs().max()), scale)
    if dtype == torch.bfloat16:
        reference = _run(eager_fn, [t.float() for t in tensors], upstream)
        ours, theirs = _rms(got, reference), _rms(want, reference)
        assert all(a <= 1.25 * b + 1e-6 for a, b in zip(ours, theirs, strict=True)), (ours, theirs)


@pytest.mark.parametrize("backend", ["compile", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [4096, 1531])
def test_fused_kernels_match_eager(backend, dtype, rows, monkeypatch):
    monkeypatch.setenv("VLM_BRIDGE_FUSED", backend)
    probe = torch.zeros(1, device="cuda")
    assert fused.fusion_enabled(probe) and (backend == "compile" or fused_triton.available(probe))
    gen = torch.Generator(device="cuda").manual_seed(0)
    x, residual = torch.randn(2, rows, 1, 640, device="cuda", generator=gen).to(dtype)
    w = (torch.randn(640, device="cuda", generator=gen) * 0.1).to(dtype)
    _compare(lambda a, b, c: fused.fp32_rms_norm(a, b, 1.0, 1e-6, c),
             lambda a, b, c: fused._rms_norm_add(a, b, c, 1.0, 1e-6), (x, w, residual), dtype)
    heads = torch.randn(rows, 1, 8, 256, device="cuda", generator=gen).to(dtype)
    _compare(lambda a, b: fused.fp32_rms_norm(a, b, 1.0, 1e-6), lambda a, b: fused._rms_norm(a, b, 1.0, 1e-6),
             (heads, torch.randn(256, device="cuda", generator=gen).to(dtype)), dtype)
    glu = torch.randn(rows, 1, 2 * 1280, device="cuda", generator=gen).to(dtype)
    _compare(fused.gelu_tanh_glu, fused._gelu_tanh_glu, (glu,), dtype)
    wide = torch.randn(rows // 8, 2, 2 * 10240, device="cuda", generator=gen).to(dtype)  # Gemma-3-4B's fc1
    _compare(fused.gelu_tanh_glu, fused._gelu_tanh_glu, (wide,), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_cross_entropy_matches_fp32_loss(dtype):
    """The fused whole-logits loss at a real vocabulary (152,064 columns, 64 of them padding here)
    against torch's cross-entropy of the fp32 logits: loss and logits gradient."""
    from vlm_bridge.families._common.fused_cross_entropy import fused_vocab_parallel_cross_entropy

    vocab, padded = 152000, 152064
    gen = torch.Generator(device="cuda").manual_seed(1)
    logits = (torch.randn(1531, 1, padded, device="cuda", generator=gen) * 3).to(dtype)
    logits[..., vocab:] = 0
    labels = torch.randint(0, vocab, (1531, 1), device="cuda", generator=gen)
    upstream = torch.rand(1531, 1, device="cuda", generator=gen)
    ours = logits.clone().requires_grad_()
    loss = fused_vocab_parallel_cross_entropy(ours, labels, vocab)
    loss.backward(upstream)
    reference = logits.float().clone().requires_grad_()
    masked = reference.masked_fill(torch.arange(padded, device="cuda") >= vocab, float("-inf"))
    want = torch.nn.functional.cross_entropy(masked.view(-1, padded), labels.view(-1), reduction="none")
    want.backward(upstream.view(-1))
    torch.testing.assert_close(loss.view(-1), want, rtol=1e-5, atol=1e-5)
    # fp32: exp(x - lse) against torch's softmax differs by a few fp32 steps (5e-7 seen at 0.37 on an
    # H100); bf16: one rounding of each gradient
    tol = 4e-6 if dtype == torch.float32 else 2**-8
    torch.testing.assert_close(ours.grad.float(), reference.grad, rtol=tol, atol=1e-6)
    assert not ours.grad[..., vocab:].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rope_matches_megatron_and_is_installed(dtype):
    """The fused RoPE at a Qwen query's shape (28 heads of 128, 3-D MRoPE angles) against
    Megatron's torch RoPE; in bf16 its error against the fp32 result does not exceed Megatron's."""
    from megatron.core.models.common.embeddings import rope_utils

    from vlm_bridge.families._common import fused_rope
    from vlm_bridge.families._common.megatron_config import common_kwargs

    assert common_kwargs(torch.bfloat16)["apply_rope_fusion"]
    assert rope_utils.fused_apply_rotary_pos_emb is fused_rope.fused_apply_rotary_pos_emb
    gen = torch.Generator(device="cuda").manual_seed(3)
    qkv = torch.randn(2048, 1, 36, 128, device="cuda", generator=gen).to(dtype)
    query = qkv[:, :, :28]
    freqs = torch.randn(2048, 1, 1, 128, device="cuda", generator=gen) * 50

    def megatron(t):
        return rope_utils._apply_rotary_pos_emb_bshd(t, freqs)

    _compare(lambda t: fused_rope.fused_apply_rotary_pos_emb(t, freqs), megatron, (query,), dtype)
