"""MoE experts as two grouped GEMMs, keeping ``SequentialMLP``'s parameters and checkpoints.

Without Transformer Engine or the ``grouped_gemm`` package Megatron-Core runs the local experts of
a MoE layer one after another (``SequentialMLP``): 2 x E small matmuls plus their launches per layer,
which is most of a MoE step at 128 experts. ``GroupedGemmExperts`` keeps the exact same modules
(``local_experts.<i>.linear_fc1 / linear_fc2``), so conversion, distributed checkpoints, EP/TP
sharding and LoRA are untouched, and only changes the forward: the local expert weights are
stacked (a copy of E x 3 x H x I values, cheap next to the matmuls) and each projection runs as one
``torch._grouped_mm`` over the tokens sorted by expert, which is what HF transformers uses for its
own fused experts. Where that kernel does not apply (CPU, fp32, no tokens) the same stacked weights
go through a per-expert loop, so the grouped code path is also exercised by the CPU tests.

It falls back to ``SequentialMLP.forward`` whole when an expert linear is wrapped (``apply_lora``
never wraps them, but anything else may), has a bias, or runs in fp8/fp4.
``VLM_BRIDGE_MOE_EXPERTS=sequential`` forces the sequential path (benchmarks compare the two).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from megatron.core.fusions.fused_bias_swiglu import weighted_bias_swiglu_impl
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.moe.experts import SequentialMLP

EXPERTS_ENV = "VLM_BRIDGE_MOE_EXPERTS"


def experts_module() -> type[SequentialMLP]:
    """The experts class the layer specs build: grouped unless the environment asks otherwise."""
    choice = os.environ.get(EXPERTS_ENV, "grouped")
    if choice not in ("grouped", "sequential"):
        raise ValueError(f"{EXPERTS_ENV}={choice!r}: expected 'grouped' or 'sequential'")
    return GroupedGemmExperts if choice == "grouped" else SequentialMLP


def _group_ends(counts: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(counts, device=device, dtype=torch.int32).cumsum(0, dtype=torch.int32)


def _uses_grouped_kernel(x: torch.Tensor) -> bool:
    return x.is_cuda and x.dtype == torch.bfloat16 and x.shape[0] > 0 and hasattr(torch, "_grouped_mm")


def grouped_matmul(
    x: torch.Tensor, weights: torch.Tensor, counts: list[int], offsets: torch.Tensor | None = None
) -> torch.Tensor:
    """``cat_e(x_e @ weights[e].T)`` for consecutive row groups ``x_e`` of sizes ``counts``.

    ``weights`` is ``[E, out, in]`` (the nn.Linear layout). On CUDA in bf16 this is one
    ``torch._grouped_mm`` (Hopper grouped GEMM; it wants the second operand column-major, which the
    transposed view of the stacked row-major weights is) over the group ends ``offsets`` (int32 on
    the device; computed from ``counts`` when not given).
    """
    if _uses_grouped_kernel(x):
        offsets = offsets if offsets is not None else _group_ends(counts, x.device)
        return torch._grouped_mm(x, weights.transpose(-2, -1), offs=offsets)
    parts = [rows @ w.T for rows, w in zip(torch.split(x, counts), weights.unbind(0))]
    return torch.cat(parts) if parts else x.new_zeros(0, weights.shape[1])


class GroupedGemmExperts(SequentialMLP):
    """``SequentialMLP`` whose forward runs all local experts as grouped GEMMs (see the module doc)."""

    def _groupable(self) -> bool:
        cfg = self.config
        if self.num_local_experts == 1 or cfg.fp8 or cfg.fp4 or cfg.add_bias_linear:
            return False
        if cfg.moe_apply_probs_on_input or getattr(cfg, "use_te_activation_func", False):
            return False
        # Exact types: a LoRA wrapper (or any other subclass) brings its own forward.
        return all(type(e.linear_fc1) is ColumnParallelLinear and type(e.linear_fc2) is RowParallelLinear
                   for e in self.local_experts)

    def _stacked(self, weights: list[torch.Tensor], attr: str) -> torch.Tensor:
        """The local experts' weights as one ``[E, out, in]`` tensor.

        Trained weights are stacked anew each forward (their gradients flow back to each expert's
        parameter, and a data-parallel buffer may own their storage). Frozen ones (LoRA, which never
        adapts experts; inference) are moved once into one stacked tensor, each parameter becoming
        a view of its slice: no copy per forward (4 bytes a parameter of traffic, every layer of
        every decoding step), and none kept for the backward (the stack is what the grouped GEMM
        saves: 0.6 GB a layer for 64 local experts of hidden 2048 and expert width 768).
        """
        if torch.is_grad_enabled() and any(w.requires_grad for w in weights):
            return torch.stack(weights)
        stacked = self.__dict__.get(attr)  # a plain attribute: not in the state dict
        if stacked is None or stacked.shape[0] != len(weights) or any(
                w.data_ptr() != part.data_ptr() or w.shape != part.shape
                for w, part in zip(weights, stacked, strict=True)):
            if any(w.requires_grad for w in weights):  # trainable but run without grad: no moving
                return torch.stack(weights)
            stacked = torch.stack([w.detach() for w in weights])
            for w, part in zip(weights, stacked, strict=True):
                w.data = part
            self.__dict__[attr] = stacked
        return stacked

    def _activate(self, fc1_out: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """The expert MLP's activation and routing-probability scale, as ``MLP.forward`` does it."""
        cfg = self.config
        if cfg.bias_activation_fusion and cfg.gated_linear_unit and cfg.activation_func is F.silu:
            return weighted_bias_swiglu_impl(fc1_out, None, probs.unsqueeze(-1),
                                             cfg.activation_func_fp8_input_store)
        if cfg.gated_linear_unit:
            gate, linear = torch.chunk(fc1_out, 2, dim=-1)
            if (clamp := cfg.activation_func_clamp_value) is not None:
                gate, linear = gate.clamp(max=clamp), linear.clamp(min=-clamp, max=clamp)
            out = cfg.activation_func(gate) * (linear + cfg.glu_linear_offset)
        else:
            out = cfg.activation_func(fc1_out)
        return (out * probs.unsqueeze(-1)).to(out.dtype)

    def forward(
        self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert: torch.Tensor,
        permuted_probs: torch.Tensor,
    ) -> tuple[torch.Tensor, None]:
        if not self._groupable():
            return super().forward(permuted_local_hidden_states, tokens_per_expert, permuted_probs)
        x = permuted_local_hidden_states
        counts = [int(c) for c in tokens_per_expert.tolist()]
        offsets = _group_ends(counts, x.device) if _uses_grouped_kernel(x) else None  # both projections
        fc1 = self._stacked([e.linear_fc1.weight for e in self.local_experts], "_fc1_stack")
        fc2 = self._stacked([e.linear_fc2.weight for e in self.local_experts], "_fc2_stack")
        hidden = self._activate(grouped_matmul(x, fc1, counts, offsets), permuted_probs)
        # Expert linears never reduce over TP themselves (Megatron's dispatcher combines the partial
        # sums), so per-rank local matmuls are the whole computation at any TP x EP.
        return grouped_matmul(hidden, fc2, counts, offsets), None
