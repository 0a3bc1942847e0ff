"""AdamW with bf16 moments: with fp32 moments the same arithmetic is torch's AdamW step for step
(bias correction, decoupled weight decay, eps, parameters updated a slice at a time); with bf16
moments the states are bf16 and the weights stay close to fp32 Adam's; the class swap is scoped
and a wrong setting is a one-line error."""

from __future__ import annotations

import pytest
import torch

from vlm_bridge.train import low_memory_adam
from vlm_bridge.train.low_memory_adam import AdamWBf16Moments, FusedAdamW, adam_class, check_moments


class _Fp32Moments(AdamWBf16Moments):
    MOMENT_DTYPE = torch.float32


def _run(cls, steps: int = 5) -> tuple[torch.Tensor, torch.optim.Optimizer]:
    g = torch.Generator().manual_seed(0)
    param = torch.nn.Parameter(torch.randn(37, 11, generator=g))
    opt = cls([param], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for _ in range(steps):
        param.grad = torch.randn(param.shape, generator=g)
        opt.step()
    return param.detach(), opt


def test_fp32_moments_are_torch_adamw_step_for_step(monkeypatch):
    monkeypatch.setattr(low_memory_adam, "SLICE", 100)  # 407 elements: five slices, the last short
    ours, _ = _run(_Fp32Moments)
    theirs, _ = _run(torch.optim.AdamW)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


def test_bf16_moments_are_stored_in_bf16_and_stay_close():
    ours, opt = _run(AdamWBf16Moments)
    theirs, _ = _run(torch.optim.AdamW)
    state = next(iter(opt.state.values()))
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16
    assert ours.dtype == torch.float32
    assert (ours - theirs).abs().max() < 2e-3 * theirs.abs().max()
    assert not torch.equal(ours, theirs)  # the rounding is real


def test_fp32_state_from_a_checkpoint_set_up_becomes_bf16():
    param = torch.nn.Parameter(torch.ones(4))
    opt = AdamWBf16Moments([param], lr=0.1)
    opt.state[param].update(step=torch.tensor(0.0), exp_avg=torch.zeros(4), exp_avg_sq=torch.zeros(4))
    param.grad = torch.ones(4)
    opt.step()
    assert opt.state[param]["exp_avg"].dtype == torch.bfloat16


def test_adam_class_swap_is_scoped_and_checked():
    original = torch.optim.AdamW
    with adam_class("bf16"):
        assert torch.optim.AdamW is AdamWBf16Moments
    assert torch.optim.AdamW is original
    with adam_class("fp32"):
        assert torch.optim.AdamW is FusedAdamW
        # on the CPU it stays torch's default implementation
        assert not torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))]).defaults["fused"]
    with pytest.raises(ValueError, match="fp32 or bf16"), adam_class("fp8"):
        pass


def test_moments_override_names_the_choices():
    from vlm_bridge.recipes import get_recipe
    from vlm_bridge.train.config import apply_overrides

    with pytest.raises(ValueError, match="optim.moments: 'fp16' is not one of fp32, bf16"):
        apply_overrides(get_recipe("demo_tiny"), ["optim.moments=fp16"])
    assert apply_overrides(get_recipe("demo_tiny"), ["optim.moments=bf16"]).optim.moments == "bf16"


def test_bf16_moments_refuse_a_decay_that_rounds_away():
    check_moments("bf16", 0.9, 0.95)
    check_moments("fp32", 0.9, 0.999)
    with pytest.raises(ValueError, match="adam_beta2 <= 0.99 .got 0.9/0.999."):
        check_moments("bf16", 0.9, 0.999)
    # why: a 0.1% decay of a bf16 value rounds back to the value itself
    v = torch.tensor([1.0, 3.0, 0.37], dtype=torch.bfloat16)
    assert torch.equal((v.float() * 0.999).to(torch.bfloat16), v)


def test_a_decoupled_bf16_gradient_updates_as_its_clipped_fp32_copy():
    """train/decoupled_grads.py hands the bf16 gradient over with the clipping coefficient; the
    update widens and scales it as Megatron's fp32 copy, clipped in place, would be."""
    gen = torch.Generator().manual_seed(3)
    start = torch.randn(300, generator=gen)
    grads = [torch.randn(300, generator=gen).to(torch.bfloat16) for _ in range(3)]

    def run(decoupled: bool) -> torch.Tensor:
        param = torch.nn.Parameter(start.clone())
        opt = AdamWBf16Moments([param], lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
        for grad, scale in zip(grads, (0.25, 1.0, 0.05), strict=True):
            if decoupled:
                param.grad, param.decoupled_grad, param.decoupled_grad_scale = None, grad, scale
            else:
                param.grad = grad.float() * scale
            opt.step()
        return param.detach()

    assert torch.equal(run(True), run(False))


def test_fused_adamw_keeps_fused_when_resuming_a_foreach_state():
    """A checkpoint saved by torch's default AdamW resumes in the fused one (torch's fused kernel
    runs on the CPU too, so the test needs no GPU): same update, fused stays on."""
    def run(cls, state=None, steps=3, **kw):
        g = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(n, generator=g)) for n in (7, 300)]
        opt = cls([{"params": params}], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, **kw)
        if state is not None:
            opt.load_state_dict(state)
        for _ in range(steps):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        return params, opt

    import copy

    _, saved = run(torch.optim.AdamW, steps=2)
    state = saved.state_dict()  # its tensors are the optimizer's own: each load gets a copy
    resumed, opt = run(FusedAdamW, copy.deepcopy(state), steps=1, fused=True)
    assert all(group["fused"] for group in opt.param_groups)
    assert all(float(s["step"]) == 3 for s in opt.state.values())
    reference, _ = run(torch.optim.AdamW, copy.deepcopy(state), steps=1)
    for a, b in zip(resumed, reference):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
