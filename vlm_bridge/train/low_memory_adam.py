"""AdamW with its two moments stored in bf16, for full fine-tuning on less memory.

Megatron's mixed-precision optimizer keeps fp32 master weights and hands them, with fp32
gradients, to a torch AdamW whose moments are fp32 too: 8 of the 18 bytes each parameter costs.
Here the moments are stored in bf16 (4 bytes), while the update itself still runs in fp32 on the
fp32 master weights: each step widens a slice of the moments to fp32, updates it, applies it and
rounds it back. Trade-off: the moments carry 8 mantissa bits and are rounded to nearest, so a
step changes a moment only when it moves it by more than half a bf16 step, 1/512 to 1/256 of
itself. With beta2 = 0.95 a step's decay (5%) always survives; with beta2 = 0.999 the 0.1% decay
rounds away and the second moment would never shrink, so bf16 moments are refused for
``beta2 > MAX_BETA2``. The master weights stay fp32, so small updates are not lost.

On GPUs one Triton kernel does the whole update (``adam_triton``); elsewhere the torch update
below runs, a slice at a time.

Megatron builds its optimizer from ``torch.optim.AdamW`` when neither Transformer Engine nor Apex is
installed; :func:`adam_class` swaps this class in for that one call.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator

import torch

from vlm_bridge.train.adam_triton import fused_update
from vlm_bridge.train.decoupled_grads import main_grad

# Elements updated at a time: the fp32 working copies of a slice (gradient, moments, denominator)
# are 4 x 256 MB whatever the parameter's size (a 152k x 3584 embedding would otherwise need
# 8.7 GB of temporaries).
SLICE = 64 * 1024 * 1024
# A step's decay of a moment, 1 - beta, must exceed bf16's half step (up to 1/256) to survive.
MAX_BETA2 = 0.99


def check_moments(moments: str, beta1: float, beta2: float) -> None:
    """One-line refusal of bf16 moments whose decay bf16 rounding would erase."""
    if moments == "bf16" and max(beta1, beta2) > MAX_BETA2:
        raise ValueError(f"optim.moments=bf16 needs optim.adam_beta1/adam_beta2 <= {MAX_BETA2} (got "
                         f"{beta1}/{beta2}): a smaller decay per step rounds away in bf16; "
                         "use optim.moments=fp32")


class AdamWBf16Moments(torch.optim.AdamW):
    """``torch.optim.AdamW`` (decoupled weight decay, bias correction) with bf16 moments."""

    MOMENT_DTYPE = torch.bfloat16
    # Takes a bf16 gradient as ``decoupled_grad`` and widens it itself (train/decoupled_grads.py).
    READS_DECOUPLED_GRADS = True

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                grad, grad_scale = main_grad(param)
                if grad is None:
                    continue
                state = self._state_for(param)
                state["step"] += 1
                step = float(state["step"])
                self._update(param, grad, grad_scale, state, group["lr"], group["weight_decay"], group["eps"],
                             beta1, beta2, 1 - beta1 ** step, math.sqrt(1 - beta2 ** step))
        return loss

    def _state_for(self, param: torch.Tensor) -> dict:
        state = self.state[param]
        if "step" not in state:
            state["step"] = torch.tensor(0.0)
        for key in ("exp_avg", "exp_avg_sq"):
            moment = state.get(key)
            if moment is None:
                state[key] = torch.zeros_like(param, dtype=self.MOMENT_DTYPE)
            elif moment.dtype != self.MOMENT_DTYPE:  # fp32 zeros from a checkpoint's state set-up
                state[key] = moment.to(self.MOMENT_DTYPE)
        return state

    @staticmethod
    def _update(param, grad, grad_scale, state, lr, weight_decay, eps, beta1, beta2, correction1,
                root_correction2) -> None:
        if fused_update(param, grad, grad_scale, state["exp_avg"], state["exp_avg_sq"], lr, weight_decay, eps,
                        beta1, beta2, correction1, root_correction2):
            return
        flat_param, flat_grad = param.view(-1), grad.reshape(-1)
        flat_m, flat_v = state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1)
        for start in range(0, flat_param.numel(), SLICE):
            part = slice(start, start + SLICE)
            grad = flat_grad[part].float()
            if grad_scale != 1.0:  # clipping of a bf16 gradient, applied once it is fp32
                grad = grad.mul_(grad_scale) if flat_grad.dtype != torch.float32 else grad * grad_scale
            m = flat_m[part].float().mul_(beta1).add_(grad, alpha=1 - beta1)
            v = flat_v[part].float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            flat_m[part].copy_(m)
            flat_v[part].copy_(v)
            p = flat_param[part]
            if weight_decay:
                p.mul_(1 - lr * weight_decay)
            p.addcdiv_(m, v.sqrt().div_(root_correction2).add_(eps), value=-lr / correction1)


class FusedAdamW(torch.optim.AdamW):
    """torch's AdamW with ``fused=True`` when every parameter is on a GPU: one multi-tensor kernel
    reads each parameter, gradient and moment once, where the default (``foreach``) makes a pass
    per operation (about 2.5x the memory traffic; Apex's FusedAdam, which Megatron would pick, is
    not installed). Same update, in fp32; ``VLM_BRIDGE_FUSED_ADAM=0`` keeps ``foreach``."""

    def __init__(self, params, *args, **kwargs):
        groups = list(params)
        tensors = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
        if (os.environ.get("VLM_BRIDGE_FUSED_ADAM", "1") != "0" and tensors
                and all(p.is_cuda and p.is_floating_point() for p in tensors)):
            kwargs.setdefault("fused", True)
        super().__init__(groups, *args, **kwargs)

    def load_state_dict(self, state_dict: dict) -> None:
        """torch takes the saved groups' settings, ``fused`` included: a state saved by the
        ``foreach`` implementation (step counters on the host) would switch this one back to it."""
        super().load_state_dict(state_dict)
        if not self.defaults.get("fused"):
            return
        for group in self.param_groups:
            group["fused"], group["foreach"] = True, None
            for p in group["params"]:
                state = self.state.get(p, {})
                if "step" in state:  # the fused kernel reads its counter on the parameter's device
                    state["step"] = state["step"].to(device=p.device, dtype=torch.float32)


@contextlib.contextmanager
def adam_class(moments: str) -> Iterator[None]:
    """Within the block, Megatron's optimizer factory builds :class:`AdamWBf16Moments` for
    ``moments="bf16"`` and :class:`FusedAdamW` for ``"fp32"``."""
    if moments not in ("fp32", "bf16"):
        raise ValueError(f"optim.moments must be fp32 or bf16, got {moments!r}")
    original = torch.optim.AdamW
    torch.optim.AdamW = AdamWBf16Moments if moments == "bf16" else FusedAdamW
    try:
        yield
    finally:
        torch.optim.AdamW = original
