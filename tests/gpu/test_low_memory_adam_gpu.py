"""The fused Triton AdamW (bf16 moments) equals the sliced torch update it replaces on GPUs."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_kernel_matches_the_torch_update(monkeypatch):
    from vlm_bridge.train import low_memory_adam
    from vlm_bridge.train.low_memory_adam import AdamWBf16Moments

    def run(fused: bool):
        if not fused:
            monkeypatch.setattr(low_memory_adam, "fused_update", lambda *args: False)
        g = torch.Generator(device="cuda").manual_seed(0)
        sizes = (5, 4096 * 3 + 7, 1 << 20)  # shorter than a block, a partial last block, many blocks
        params = [torch.nn.Parameter(torch.randn(n, device="cuda", generator=g)) for n in sizes]
        opt = AdamWBf16Moments(params, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
        for _ in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, device="cuda", generator=g)
            opt.step()
        monkeypatch.undo()
        return [p.detach().clone() for p in params], [opt.state[p]["exp_avg_sq"].clone() for p in params]

    fused, torch_path = run(True), run(False)
    # The kernel contracts multiply-adds, so a moment can round to the neighbouring bf16 value
    # (1/128 apart) and later updates (lr 1e-3 each) differ by that fraction of a step.
    for a, b in zip(fused[0], torch_path[0]):
        assert (a - b).abs().max() < 1e-5
    for a, b in zip(fused[1], torch_path[1]):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=0)
        assert (a != b).float().mean() < 0.01  # almost all roundings are the same


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_kernel_widens_and_clips_a_decoupled_bf16_gradient(monkeypatch):
    """A bf16 gradient handed over as ``decoupled_grad`` with a clipping coefficient (what
    train/decoupled_grads.py does) updates as its fp32 copy, clipped in place, does."""
    from vlm_bridge.train import low_memory_adam
    from vlm_bridge.train.low_memory_adam import AdamWBf16Moments

    g = torch.Generator(device="cuda").manual_seed(1)
    start = torch.randn(4096 * 3 + 7, device="cuda", generator=g)
    grads = [torch.randn(start.shape, device="cuda", generator=g).to(torch.bfloat16) for _ in range(3)]
    scales = (0.25, 1.0, 0.05)

    def run(decoupled: bool, fused: bool):
        if not fused:
            monkeypatch.setattr(low_memory_adam, "fused_update", lambda *args: False)
        param = torch.nn.Parameter(start.clone())
        opt = AdamWBf16Moments([param], lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
        for grad, scale in zip(grads, scales, strict=True):
            if decoupled:
                param.grad, param.decoupled_grad, param.decoupled_grad_scale = None, grad, scale
            else:
                param.grad = grad.float() * scale
            opt.step()
        monkeypatch.undo()
        return param.detach().clone()

    copied = run(decoupled=False, fused=False)
    assert torch.equal(run(decoupled=True, fused=False), copied)  # the same fp32 arithmetic
    assert (run(decoupled=True, fused=True) - copied).abs().max() < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp32_moments_use_torch_fused_adamw_with_the_same_update_and_state():
    from vlm_bridge.train.low_memory_adam import FusedAdamW

    def run(cls, state=None, steps=3):
        g = torch.Generator(device="cuda").manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(n, device="cuda", generator=g)) for n in (7, 1 << 20)]
        opt = cls([{"params": params}], lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
        if state is not None:  # as a checkpoint load does: step counters arrive on the CPU
            opt.load_state_dict(state)
        for _ in range(steps):
            for p in params:
                p.grad = torch.randn(p.shape, device="cuda", generator=g)
            opt.step()
        return params, opt

    fused, opt = run(FusedAdamW)
    assert opt.defaults["fused"]
    foreach, reference = run(torch.optim.AdamW)
    for a, b in zip(fused, foreach):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # a foreach optimizer's state (CPU step counters) resumes in the fused one
    resumed, opt = run(FusedAdamW, reference.state_dict(), steps=1)
    assert all(s["step"].is_cuda and float(s["step"]) == 4 for s in opt.state.values())
