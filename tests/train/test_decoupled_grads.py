"""bf16 gradients reach the bf16-moment AdamW without an fp32 copy (train/decoupled_grads.py):
the master parameters hold views of the DDP buffer, and the run equals Megatron's copy-then-clip;
the per-token loss's 1 / tokens scale is applied by the update instead of a pass over the buffer."""

from __future__ import annotations

import os

import pytest
import torch


def _steps(cfg, decoupled: bool, defer_scale: bool = False) -> dict:
    from vlm_bridge.train.trainer import forward_backward, setup, train_step

    os.environ["VLM_BRIDGE_DECOUPLED_GRADS"] = "1" if decoupled else "0"
    os.environ["VLM_BRIDGE_DEFER_TOKEN_SCALE"] = "1" if defer_scale else "0"
    try:
        run = setup(cfg)
        steps = [train_step(run) for _ in range(3)]
        forward_backward(run)
        run.optimizer.prepare_grads()
        buffers = {b.grad_data.untyped_storage().data_ptr() for b in run.model.buffers}
        inner = getattr(run.optimizer, "chained_optimizers", [run.optimizer])
        masters = [p for opt in inner for p in opt.get_parameters()]
        views = [p for p in masters if getattr(p, "decoupled_grad", None) is not None]
        return {
            "losses": [s["loss"] for s in steps], "norms": [s["grad_norm"] for s in steps],
            "params": {n: p.detach().float().clone() for n, p in run.model.module.named_parameters()},
            "fp32_grads": sum(p.grad.numel() for p in masters if p.grad is not None),
            "views_of_buffer": sum(p.decoupled_grad.untyped_storage().data_ptr() in buffers for p in views),
            "masters": len(masters),
        }
    finally:
        os.environ.pop("VLM_BRIDGE_DECOUPLED_GRADS", None)
        os.environ.pop("VLM_BRIDGE_DEFER_TOKEN_SCALE", None)


@pytest.mark.parametrize("distributed", ["off", "on"])
def test_bf16_grads_step_without_an_fp32_copy_and_match_the_copy(tiny_cfg, tmp_path, distributed):
    from vlm_bridge.parallel import run_parallel

    over = {"dtype": "bf16", "optim.grad_reduce_in_fp32": "false", "optim.moments": "bf16",
            "optim.distributed_optimizer": distributed, "optim.clip_grad": "0.5", "optim.warmup_steps": "0"}
    copied = run_parallel(_steps, 1, tiny_cfg(steps=4, output_dir=tmp_path / "copy", **over), False)
    decoupled = run_parallel(_steps, 1, tiny_cfg(steps=4, output_dir=tmp_path / "view", **over), True)
    # Megatron's path holds an fp32 copy of every gradient at the step; this one holds none
    assert copied["fp32_grads"] > 0 and copied["views_of_buffer"] == 0
    assert decoupled["fp32_grads"] == 0 and decoupled["views_of_buffer"] == decoupled["masters"] > 0
    assert min(copied["norms"]) > 0.5  # clipping was active on every step
    assert decoupled["norms"] == pytest.approx(copied["norms"], rel=1e-6)
    assert decoupled["losses"] == pytest.approx(copied["losses"], rel=1e-6)
    for name, param in copied["params"].items():
        torch.testing.assert_close(decoupled["params"][name], param, rtol=0, atol=0, msg=name)


def _step_grads(cfg, defer_scale: bool) -> dict:
    """The gradient each master parameter's update uses (times the factor it multiplies in),
    the raw bf16 buffer, and whether the finalisation deferred the scale."""
    from vlm_bridge.train import decoupled_grads
    from vlm_bridge.train.trainer import forward_backward, setup

    os.environ["VLM_BRIDGE_DEFER_TOKEN_SCALE"] = "1" if defer_scale else "0"
    try:
        run = setup(cfg)
        forward_backward(run)
        run.optimizer.prepare_grads()
        inner = getattr(run.optimizer, "chained_optimizers", [run.optimizer])
        used = []
        for param in (p for opt in inner for p in opt.get_parameters()):
            grad, factor = decoupled_grads.main_grad(param)
            used.append(grad.float() * factor)
        return {"used": used, "buffer": torch.cat([b.grad_data.float() for b in run.model.buffers]),
                "deferred": decoupled_grads.defers_token_scale(run.optimizer),
                "norm": run.optimizer.get_grad_norm()}
    finally:
        os.environ.pop("VLM_BRIDGE_DEFER_TOKEN_SCALE", None)


@pytest.mark.parametrize("buffer", ["bf16", "fp32"])
def test_the_token_scale_deferred_to_the_update_equals_megatrons_pass_over_the_buffer(tiny_cfg, tmp_path,
                                                                                      buffer):
    """The update multiplies in 1 / tokens (fp32, with the clipping coefficient) where Megatron
    scales the buffer in place: the same gradients to bf16 rounding and the same norm, while
    the buffer itself stays unscaled (no pass over it); bf16 and fp32 gradient buffers."""
    from vlm_bridge.parallel import run_parallel

    over = {"dtype": "bf16", "optim.grad_reduce_in_fp32": str(buffer == "fp32").lower(),
            "optim.moments": "bf16", "optim.distributed_optimizer": "on"}
    pass_ = run_parallel(_step_grads, 1, tiny_cfg(output_dir=tmp_path / "pass", **over), False)
    deferred = run_parallel(_step_grads, 1, tiny_cfg(output_dir=tmp_path / "defer", **over), True)
    assert deferred["deferred"] and not pass_["deferred"]
    for got, want in zip(deferred["used"], pass_["used"], strict=True):
        scale = float(want.abs().max()) or 1.0
        torch.testing.assert_close(got, want, rtol=2**-8, atol=2**-8 * scale)
    assert deferred["norm"] == pytest.approx(pass_["norm"], rel=1e-3)
    # Megatron's buffer holds the scaled gradients, the deferred one the sums over tokens
    ratio = float(deferred["buffer"].norm() / pass_["buffer"].norm())
    assert ratio > 10, ratio


@pytest.mark.parametrize("distributed", ["off", "on"])
def test_a_run_deferring_the_token_scale_follows_megatrons(tiny_cfg, tmp_path, distributed):
    """Three steps with clipping active: the same losses and norms to bf16 rounding of the buffer."""
    from vlm_bridge.parallel import run_parallel

    over = {"dtype": "bf16", "optim.grad_reduce_in_fp32": "false", "optim.moments": "bf16",
            "optim.distributed_optimizer": distributed, "optim.clip_grad": "0.5", "optim.warmup_steps": "0"}
    pass_ = run_parallel(_steps, 1, tiny_cfg(steps=4, output_dir=tmp_path / "pass", **over), True, False)
    deferred = run_parallel(_steps, 1, tiny_cfg(steps=4, output_dir=tmp_path / "defer", **over), True, True)
    assert min(pass_["norms"]) > 0.5  # clipping was active on every step
    assert deferred["norms"] == pytest.approx(pass_["norms"], rel=1e-2)
    assert deferred["losses"] == pytest.approx(pass_["losses"], rel=1e-3)


def _accumulated_grads(cfg, accumulate: bool) -> dict:
    from vlm_bridge.train.trainer import forward_backward, setup

    os.environ["VLM_BRIDGE_WGRAD_ACCUMULATE"] = "1" if accumulate else "0"
    try:
        run = setup(cfg)
        forward_backward(run)
        named = list(run.model.module.named_parameters())
        return {"grads": {n: p.main_grad.float().clone() for n, p in named if p.requires_grad},
                "in_gemm": sorted(n for n, p in named if getattr(p, "grad_added_to_main_grad", False))}
    finally:
        os.environ.pop("VLM_BRIDGE_WGRAD_ACCUMULATE", None)


def test_bf16_weight_gradients_accumulate_in_the_gemm_as_megatron_adds_them(tiny_cfg, tmp_path):
    """Two micro-batches: the linears' weight gradients summed into the bf16 buffer by the GEMM
    (one rounding per micro-batch) equal Megatron's separate add (two) to bf16 resolution; every
    other gradient is unchanged."""
    from vlm_bridge.parallel import run_parallel

    over = {"dtype": "bf16", "optim.grad_reduce_in_fp32": "false"}
    added = run_parallel(_accumulated_grads, 1, tiny_cfg(output_dir=tmp_path / "add", **over), False)
    fused = run_parallel(_accumulated_grads, 1, tiny_cfg(output_dir=tmp_path / "gemm", **over), True)
    assert added["in_gemm"] == []
    # every linear weight of both towers, and nothing else (norms, biases, embeddings)
    assert fused["in_gemm"] and all(n.endswith("weight") and "norm" not in n and "embedding" not in n
                                    for n in fused["in_gemm"])
    in_gemm = fused["in_gemm"]
    assert any(n.startswith("vision") for n in in_gemm) and any("linear_fc2" in n for n in in_gemm)
    assert "language_model.output_layer.weight" in in_gemm  # untied: Megatron built it, we swapped its class
    # under recomputation the backward runs on recomputed activations and unpacked saved tensors
    recomputed = run_parallel(_accumulated_grads, 1, tiny_cfg(output_dir=tmp_path / "re", recompute="true",
                                                              **over), True)
    assert recomputed["in_gemm"] == in_gemm
    for name, grad in added["grads"].items():
        scale = float(grad.abs().max()) or 1.0
        torch.testing.assert_close(fused["grads"][name], grad, rtol=2**-7, atol=2**-7 * scale, msg=name)
        torch.testing.assert_close(recomputed["grads"][name], grad, rtol=2**-7, atol=2**-7 * scale, msg=name)
        if name not in fused["in_gemm"]:
            assert torch.equal(fused["grads"][name], grad), name
