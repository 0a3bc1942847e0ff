"""The bias-in-GEMM parallel linears: in bf16 they round like ``torch.nn.Linear`` (one rounding, as
HF models do) where Megatron's add-after-matmul rounds twice; in fp32 they equal Megatron's
layers (outputs and gradients); a fused layer hands back no separate bias."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlm_bridge.parallel import run_parallel


def _layers_job(dtype: torch.dtype) -> dict:
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.transformer_config import TransformerConfig

    from vlm_bridge.families._common.linears import FusedBiasColumnParallelLinear, FusedBiasRowParallelLinear
    from vlm_bridge.families._common.megatron_config import common_kwargs
    from vlm_bridge.parallel import ParallelConfig, init_distributed

    init_distributed(ParallelConfig(), seed=0)
    config = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, add_bias_linear=True,
                               **common_kwargs(dtype))
    gen = torch.Generator().manual_seed(0)
    w1, b1 = torch.randn(96, 64, generator=gen) * 0.2, torch.randn(96, generator=gen)
    w2, b2 = torch.randn(64, 96, generator=gen) * 0.2, torch.randn(64, generator=gen)
    x = torch.randn(7, 2, 64, generator=gen).to(dtype)
    out = {}
    for name, column, row in (("megatron", ColumnParallelLinear, RowParallelLinear),
                              ("fused", FusedBiasColumnParallelLinear, FusedBiasRowParallelLinear)):
        fc1 = column(64, 96, config=config, init_method=lambda w: None, bias=True, gather_output=False,
                     skip_bias_add=True)
        fc2 = row(96, 64, config=config, init_method=lambda w: None, bias=True, input_is_parallel=True,
                  skip_bias_add=True)
        with torch.no_grad():
            for layer, (w, b) in ((fc1, (w1, b1)), (fc2, (w2, b2))):
                layer.weight.copy_(w)
                layer.bias.copy_(b)
        xg = x.clone().requires_grad_(True)
        h, h_bias = fc1(xg)
        h = F.gelu(h if h_bias is None else h + h_bias)
        y, y_bias = fc2(h)
        y = y if y_bias is None else y + y_bias
        y.float().square().sum().backward()
        out[name] = {"y": y.detach(), "returned_bias": (h_bias is not None, y_bias is not None),
                     "grads": [xg.grad, fc1.weight.grad, fc1.bias.grad, fc2.weight.grad, fc2.bias.grad]}
    out["nn_linear"] = F.linear(F.gelu(F.linear(x, w1.to(dtype), b1.to(dtype))), w2.to(dtype), b2.to(dtype))
    return out


def test_fp32_equals_megatron_and_returns_no_separate_bias():
    out = run_parallel(_layers_job, 1, torch.float32)
    mine, theirs = out["fused"], out["megatron"]
    assert theirs["returned_bias"] == (True, True) and mine["returned_bias"] == (False, False)
    torch.testing.assert_close(mine["y"], theirs["y"], rtol=1e-6, atol=1e-5)
    for a, b in zip(mine["grads"], theirs["grads"]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)


def test_bf16_rounds_like_nn_linear():
    out = run_parallel(_layers_job, 1, torch.bfloat16)
    assert torch.equal(out["fused"]["y"], out["nn_linear"])
    assert not torch.equal(out["megatron"]["y"], out["nn_linear"])  # the extra rounding is real
