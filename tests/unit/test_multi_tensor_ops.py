"""The sync-free stand-ins for Megatron's per-tensor gradient norm and scale fallbacks."""

from __future__ import annotations

import torch

from vlm_bridge.compat.multi_tensor import foreach_l2_norm, foreach_scale, use_foreach_multi_tensor_ops


def _tensors(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=gen).to(dtype) for shape in ((7, 3), (11,), (2, 4, 5))]


def test_l2_norm_equals_the_norm_of_all_elements():
    tensors = _tensors() + _tensors(torch.bfloat16)
    norm, per_tensor = foreach_l2_norm(2048, None, [tensors], False)
    want = torch.linalg.vector_norm(torch.cat([t.double().flatten() for t in tensors]))
    assert norm.shape == (1,) and norm.dtype == torch.float32 and per_tensor is None
    torch.testing.assert_close(norm.double(), want.reshape(1), rtol=1e-2, atol=0)  # bf16 norms round
    fp32 = _tensors()
    want = torch.linalg.vector_norm(torch.cat([t.double().flatten() for t in fp32]))
    torch.testing.assert_close(foreach_l2_norm(2048, None, [fp32], False)[0].double(), want.reshape(1))
    assert float(foreach_l2_norm(2048, None, [[]], False)[0]) == 0.0


def test_scale_in_place_and_into_other_tensors_with_a_cast():
    grads = _tensors()
    want = [g * 0.25 for g in grads]
    foreach_scale(2048, None, [grads, grads], 0.25)
    for g, w in zip(grads, want):
        assert torch.equal(g, w)
    targets = _tensors(torch.bfloat16)
    foreach_scale(2048, None, [grads, targets], 1.0)
    for t, g in zip(targets, grads):
        assert t.dtype == torch.bfloat16 and torch.equal(t, g.bfloat16())


def test_megatron_uses_them_where_apex_and_te_are_absent():
    from megatron.core.optimizer import clip_grads, optimizer

    use_foreach_multi_tensor_ops()
    assert clip_grads.l2_norm_impl is foreach_l2_norm
    assert clip_grads.multi_tensor_scale_impl is foreach_scale
    assert optimizer.multi_tensor_scale_impl is foreach_scale
