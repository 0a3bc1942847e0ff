"""Grouped-GEMM experts: the same outputs and gradients as Megatron's SequentialMLP on one layer."""

from __future__ import annotations

import pytest
import torch
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.transformer.moe.experts import SequentialMLP

from vlm_bridge.families._common.experts import (
    EXPERTS_ENV,
    GroupedGemmExperts,
    experts_module,
    grouped_matmul,
)


def test_grouped_matmul_matches_per_group_products():
    x, w = torch.randn(9, 6), torch.randn(4, 5, 6)
    counts = [3, 0, 6, 0]  # empty groups, as experts that got no tokens
    expected = torch.cat([x[:3] @ w[0].T, x[3:] @ w[2].T])
    torch.testing.assert_close(grouped_matmul(x, w, counts), expected, rtol=0, atol=0)
    assert grouped_matmul(x[:0], w, [0, 0, 0, 0]).shape == (0, 5)


def test_environment_picks_the_experts_class(monkeypatch):
    assert experts_module() is GroupedGemmExperts
    monkeypatch.setenv(EXPERTS_ENV, "sequential")
    assert experts_module() is SequentialMLP
    monkeypatch.setenv(EXPERTS_ENV, "fast")
    with pytest.raises(ValueError, match=EXPERTS_ENV):
        experts_module()


def _compare_on_first_moe_layer(hf_dir: str) -> dict:
    from vlm_bridge.loading import load_hf
    from vlm_bridge.parallel import ParallelConfig, init_distributed

    init_distributed(ParallelConfig(), seed=0)
    built = load_hf(hf_dir, ParallelConfig(), torch.float32)
    experts = next(m for m in built.model.modules() if isinstance(m, GroupedGemmExperts))
    hidden_size = experts.local_experts[0].linear_fc1.weight.shape[1]
    counts = torch.tensor([5, 0, 11, 2][: experts.num_local_experts])
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randn(int(counts.sum()), hidden_size, generator=gen)
    probs = torch.rand(int(counts.sum()), generator=gen)

    def run(forward):
        experts.zero_grad(set_to_none=True)
        x = tokens.clone().requires_grad_(True)
        out, bias = forward(experts, x, counts, probs)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads = [p.grad.clone() for p in experts.parameters()]
        return out.detach(), bias, x.grad, grads

    grouped, sequential = run(GroupedGemmExperts.forward), run(SequentialMLP.forward)
    groupable = experts._groupable()
    # A wrapped expert linear (as LoRA does) must send the layer back to the sequential path.
    wrapper = type("Wrapped", (ColumnParallelLinear,), {})
    experts.local_experts[0].linear_fc1.__class__ = wrapper
    return {"grouped": grouped, "sequential": sequential, "groupable": groupable,
            "groupable_when_wrapped": experts._groupable(), "experts": experts.num_local_experts}


def test_grouped_experts_equal_sequential(tiny_qwen3_moe):
    from vlm_bridge.parallel import run_parallel

    res = run_parallel(_compare_on_first_moe_layer, 1, str(tiny_qwen3_moe))
    assert res["experts"] == 4 and res["groupable"] and not res["groupable_when_wrapped"]
    (out_g, bias_g, dx_g, dw_g), (out_s, bias_s, dx_s, dw_s) = res["grouped"], res["sequential"]
    assert bias_g is None and bias_s is None
    torch.testing.assert_close(out_g, out_s, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dx_g, dx_s, rtol=1e-6, atol=1e-6)
    assert len(dw_g) == len(dw_s) == 8
    for g, s in zip(dw_g, dw_s):
        torch.testing.assert_close(g, s, rtol=1e-6, atol=1e-6)
    # The expert with no tokens gets a zero gradient, not a missing one.
    assert dw_g[2].abs().max() == 0 and dw_g[3].abs().max() == 0


def _lora_targets(hf_dir: str) -> dict:
    from vlm_bridge.loading import load_hf
    from vlm_bridge.parallel import ParallelConfig, init_distributed
    from vlm_bridge.peft.lora import LoraConfig, apply_lora

    init_distributed(ParallelConfig(), seed=0)
    built = load_hf(hf_dir, ParallelConfig(), torch.float32)
    wrapped = apply_lora(built.model, LoraConfig())  # default targets include linear_fc1 / fc2
    groups = [m for m in built.model.modules() if isinstance(m, GroupedGemmExperts)]
    return {"wrapped": wrapped, "groupable": [g._groupable() for g in groups]}


def test_lora_leaves_moe_experts_grouped(tiny_qwen3_moe):
    from vlm_bridge.parallel import run_parallel

    res = run_parallel(_lora_targets, 1, str(tiny_qwen3_moe))
    assert res["wrapped"] and not [n for n in res["wrapped"] if ".experts." in n]
    assert {n.rsplit(".", 1)[-1] for n in res["wrapped"]} == {"linear_qkv", "linear_proj"}
    assert res["groupable"] and all(res["groupable"])


def _frozen_experts(hf_dir: str) -> dict:
    """Frozen experts (LoRA, inference): their weights move once into one stacked tensor, which
    each forward passes without a copy and without saving one for the backward."""
    from vlm_bridge.loading import load_hf
    from vlm_bridge.parallel import ParallelConfig, init_distributed

    init_distributed(ParallelConfig(), seed=0)
    built = load_hf(hf_dir, ParallelConfig(), torch.float32)
    experts = next(m for m in built.model.modules() if isinstance(m, GroupedGemmExperts))
    keys = sorted(experts.state_dict())
    hidden_size = experts.local_experts[0].linear_fc1.weight.shape[1]
    counts = torch.tensor([5, 0, 11, 2])
    gen = torch.Generator().manual_seed(0)
    tokens, probs = torch.randn(int(counts.sum()), hidden_size, generator=gen), torch.rand(18, generator=gen)

    def run(forward):
        x = tokens.clone().requires_grad_(True)
        params = {p.untyped_storage().data_ptr() for p in experts.parameters()}
        saved = {}

        def pack(tensor):
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            out, _ = forward(experts, x, counts, probs)
        out.sum().backward()
        params |= {p.untyped_storage().data_ptr() for p in experts.parameters()}
        copies = sorted(n for ptr, n in saved.items() if ptr not in params)
        return out.detach(), x.grad, copies

    trained = run(GroupedGemmExperts.forward)
    experts.requires_grad_(False)
    sequential = run(SequentialMLP.forward)
    first = run(GroupedGemmExperts.forward)
    stack = experts.__dict__["_fc1_stack"]
    second = run(GroupedGemmExperts.forward)
    views = all(e.linear_fc1.weight.data_ptr() == part.data_ptr()
                for e, part in zip(experts.local_experts, stack, strict=True))
    stacks = [sum(e.get_parameter(f"{name}.weight").nbytes for e in experts.local_experts)
              for name in ("linear_fc1", "linear_fc2")]
    return {"trained": trained, "sequential": sequential, "first": first, "second": second, "views": views,
            "same_stack": experts.__dict__["_fc1_stack"] is stack, "stacks": stacks,
            "keys_kept": sorted(experts.state_dict()) == keys}


def test_frozen_experts_run_from_one_stacked_tensor_without_copies(tiny_qwen3_moe):
    from vlm_bridge.parallel import run_parallel

    res = run_parallel(_frozen_experts, 1, str(tiny_qwen3_moe))
    assert res["views"] and res["same_stack"] and res["keys_kept"]
    out_s, dx_s, _ = res["sequential"]
    for out, dx, _ in (res["trained"], res["first"], res["second"]):
        torch.testing.assert_close(out, out_s, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(dx, dx_s, rtol=1e-6, atol=1e-6)
    # trained weights are stacked anew and the stacks are saved for the backward; frozen ones are not
    fc1_stack, fc2_stack = res["stacks"]
    assert fc1_stack in res["trained"][2] and fc2_stack in res["trained"][2], res["trained"][2]
    for copies in (res["first"][2], res["second"][2]):
        assert fc1_stack not in copies and fc2_stack not in copies, (res["stacks"], copies)
