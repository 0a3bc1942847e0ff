"""A Mamba-2 mixer as a Megatron-Core module, in plain torch (no Transformer Engine, no mamba_ssm).

Megatron-Core's own ``MambaMixer`` needs the ``mamba_ssm`` and ``causal_conv1d`` CUDA kernels; this
one keeps its parameter names and tensor-parallel layout (so checkpoints and conversion line up with
Megatron's) and computes what transformers' torch Mamba-2 mixers compute:

    in_proj -> [z, x, B, C, dt];  xBC = silu(causal depthwise conv(xBC));
    dt = clamp(softplus(dt + dt_bias));  y = SSD scan(x, dt, A = -exp(A_log), B, C) + D * x;
    out_proj(group RMSNorm(y * silu(z)))

Tensor parallelism splits heads and groups: rank r holds ``[z_r, x_r, B_r, C_r, dt_r]`` of
``in_proj`` (each of the five parts cut in ``tp`` pieces), the matching ``[x_r, B_r, C_r]`` conv
channels, its heads' ``dt_bias`` / ``A_log`` / ``D`` and its groups' norm weights; ``out_proj``
is row-parallel. Everything between the two projections is rank-local.

Packed rows (``segment_ids``) are exact: conv taps and the SSM state stop at sample boundaries.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    set_tensor_model_parallel_attributes,
)
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from vlm_bridge.families._common import fused, ssd_triton
from vlm_bridge.families._common.megatron_config import require_divisible, skip_init
from vlm_bridge.families._common.modules import swap_first_dims
from vlm_bridge.families._common.ssd_scan import (
    ConvFixups,
    causal_conv1d,
    recomputed_ssd_scan,
    segment_runs,
    ssd_scan,
)


@dataclass(frozen=True)
class MambaSettings:
    """Shape and numerics of one Mamba-2 mixer (the hidden size comes from the TransformerConfig).

    ``dt`` is clamped to ``[max(time_step_limit[0], time_step_min), time_step_limit[1]]``:
    transformers' hybrid models floor it at ``time_step_min``; ``time_step_min=0`` gives the plain
    ``time_step_limit`` clamp of other Mamba-2 implementations.
    """

    num_heads: int
    head_dim: int
    n_groups: int
    d_state: int
    d_conv: int
    chunk_size: int
    time_step_min: float = 0.0
    time_step_limit: tuple[float, float] = (0.0, math.inf)
    norm_eps: float = 1e-5
    conv_bias: bool = True
    proj_bias: bool = False

    @property
    def d_inner(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def dt_range(self) -> tuple[float, float]:
        return max(self.time_step_limit[0], self.time_step_min), self.time_step_limit[1]

    def in_proj_sizes(self, tp: int = 1) -> list[int]:
        """Rows of one rank's ``in_proj`` per part ``[z, x, B, C, dt]``."""
        bc = self.n_groups * self.d_state // tp
        return [self.d_inner // tp, self.d_inner // tp, bc, bc, self.num_heads // tp]

    def conv_sizes(self, tp: int = 1) -> list[int]:
        """Channels of one rank's ``conv1d`` per part ``[x, B, C]``."""
        return self.in_proj_sizes(tp)[1:4]


@functools.cache
def _skip_gate_norm(group_size: int, eps: float) -> Callable:
    """The chain between the scan and ``out_proj`` for one norm shape (constants closed over, so
    its compiled kernel is specialised to them): ``weight * rmsnorm_per_group((y + D x) *
    silu(gate))`` in fp32, cast to the gate's (activation) dtype."""

    def chain(y: torch.Tensor, x: torch.Tensor, D: torch.Tensor, gate: torch.Tensor,
              weight: torch.Tensor) -> torch.Tensor:
        y = (y + D.float()[:, None] * x.float()).flatten(-2)  # [..., heads, head_dim] -> [..., d_inner]
        gated = (y * F.silu(gate.float())).unflatten(-1, (-1, group_size))
        normed = gated * torch.rsqrt(gated.pow(2).mean(-1, keepdim=True) + eps)
        return (weight.float() * normed.flatten(-2)).to(gate.dtype)

    return chain


class GatedGroupRMSNorm(torch.nn.Module):
    """``weight * rmsnorm_per_group(y * silu(gate))`` in fp32 (the gate applied before the norm),
    with the scan's ``D`` skip folded in; the result is in the gate's dtype.

    Groups are ``group_size`` consecutive channels, so a TP shard holding whole groups normalises
    exactly as the full layer does. On a GPU the chain is one generated kernel per direction
    (:mod:`.fused`): in torch ops it is a dozen passes over fp32 activations, four of them kept for
    the backward.
    """

    def __init__(self, size: int, group_size: int, eps: float, device=None, dtype=None) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(size, device=device, dtype=dtype))
        self.group_size = group_size
        self.eps = eps

    def forward(self, y: torch.Tensor, x: torch.Tensor, D: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """``y`` and ``x`` ``[..., heads, head_dim]`` (scan output and its input), ``D``
        ``[heads]``, ``gate`` ``[..., heads * head_dim]``."""
        chain = _skip_gate_norm(self.group_size, self.eps)
        return fused.run_fused(chain, y, x, D, gate, self.weight)


class MambaMixer(MegatronModule):
    """Mamba-2 mixer with Megatron's parameter names, ``[s, b, h]`` in and out.

    ``forward(hidden_states, segment_ids)`` returns ``(output, None)`` (``out_proj``'s bias, if
    any, is already added). ``prefill`` / ``step`` are the same computation split for generation.
    """

    def __init__(
        self, config: TransformerConfig, settings: MambaSettings, layer_number: int | None = None, **kwargs
    ) -> None:
        super().__init__(config=config)
        s = settings
        tp = config.tensor_model_parallel_size
        require_divisible([("Mamba heads", s.num_heads, tp, "--tp"),
                           ("Mamba groups", s.n_groups, tp, "--tp")])
        if s.num_heads % s.n_groups:
            raise ValueError(f"Mamba heads ({s.num_heads}) must be a multiple of the groups ({s.n_groups})")
        self.settings = s
        self.layer_number = layer_number
        self.heads, self.groups = s.num_heads // tp, s.n_groups // tp
        self.d_inner = s.d_inner // tp
        self.conv_dim = sum(s.conv_sizes(tp))
        tp_group = parallel_state.get_tensor_model_parallel_group()
        self.in_proj = ColumnParallelLinear(
            config.hidden_size, sum(s.in_proj_sizes()), config=config, init_method=skip_init,
            bias=s.proj_bias, gather_output=False, tp_group=tp_group,
        )
        # Its rows are five parts, each split over TP on its own; LoRA shards its B rows alike.
        self.in_proj.tp_parts = tuple(s.in_proj_sizes())
        # The rank-local parameters live where Megatron put the linears' weights.
        factory = dict(device=self.in_proj.weight.device, dtype=config.params_dtype)
        self.conv1d = torch.nn.Conv1d(
            self.conv_dim, self.conv_dim, kernel_size=s.d_conv, groups=self.conv_dim,
            padding=s.d_conv - 1, bias=s.conv_bias, **factory,
        )
        # Placeholders (A = -1, softplus(0) steps, D = 1): conversion or a checkpoint overwrites them.
        self.dt_bias = torch.nn.Parameter(torch.zeros(self.heads, **factory))
        self.A_log = torch.nn.Parameter(torch.zeros(self.heads, **factory))
        self.D = torch.nn.Parameter(torch.ones(self.heads, **factory))
        self.norm = GatedGroupRMSNorm(self.d_inner, s.d_inner // s.n_groups, s.norm_eps, **factory)
        self.out_proj = RowParallelLinear(
            s.d_inner, config.hidden_size, config=config, init_method=skip_init, bias=s.proj_bias,
            input_is_parallel=True, skip_bias_add=False, tp_group=tp_group,
        )
        for param in (*self.conv1d.parameters(), self.dt_bias, self.A_log, self.D, self.norm.weight):
            set_tensor_model_parallel_attributes(param, True, 0, 1)

    def forward(
        self, hidden_states: torch.Tensor, segment_ids: torch.Tensor | None = None,
        runs: torch.Tensor | None = None, fixups: ConvFixups | None = None,
    ) -> tuple[torch.Tensor, None]:
        """``hidden_states`` ``[s, b, h]``; ``segment_ids`` ``[b, s]`` (packed samples 0, 1, ...,
        padding -1), None for one sample per row; or their ``segment_runs`` and ``conv_fixups``
        computed once for every layer."""
        runs = runs if runs is not None else segment_runs(segment_ids)
        out, _, _ = self._mix(hidden_states, runs, fixups=fixups)
        return out, None

    def prefill(
        self, hidden_states: torch.Tensor, segment_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`forward` plus the states :meth:`step` continues from: the last ``d_conv - 1``
        conv inputs ``[b, conv_dim, d_conv - 1]`` and the fp32 SSM state ``[b, heads, head_dim,
        d_state]``, both of each row's last run (left padding is fine, right padding is not)."""
        return self._mix(hidden_states, segment_runs(segment_ids), conv_tail=True)

    def step(
        self, hidden_states: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One token ``[1, b, h]`` from the states of :meth:`prefill` (or zeros); returns the
        output and the new states (the inputs are left untouched)."""
        s = self.settings
        zxbcdt, _ = self.in_proj(hidden_states)
        z, xbc, dt = zxbcdt[0].split([self.d_inner, self.conv_dim, self.heads], dim=-1)
        window = torch.cat([conv_state, xbc[..., None]], dim=-1)
        weight = self.conv1d.weight[:, 0, :]
        xbc = (window.to(weight.dtype) * weight).sum(-1)
        if self.conv1d.bias is not None:
            xbc = xbc + self.conv1d.bias
        x, B, C = F.silu(xbc).split(s.conv_sizes(self.config.tensor_model_parallel_size), dim=-1)
        batch = x.shape[0]
        x = x.reshape(batch, self.heads, s.head_dim)
        per_group = self.heads // self.groups
        B = B.float().reshape(batch, self.groups, s.d_state).repeat_interleave(per_group, dim=1)
        C = C.float().reshape(batch, self.groups, s.d_state).repeat_interleave(per_group, dim=1)
        # HF's decoding step (``selective_state_update``) takes softplus(dt + bias) with no
        # ``time_step_min`` floor, unlike its chunked scan: follow it, so generation matches HF's.
        dt = self._dt(dt, floor=False)  # [b, heads]
        decay = torch.exp(dt * self._A())
        ssm_state = (ssm_state.float() * decay[..., None, None]
                     + (dt[..., None] * x.float())[..., None] * B[:, :, None, :])
        y = torch.einsum("bhpn,bhn->bhp", ssm_state, C)
        out = self._output(y[:, None], x[:, None], z[:, None], hidden_states.dtype)
        return out, window[..., 1:], ssm_state

    def _dt(self, dt: torch.Tensor, floor: bool = True) -> torch.Tensor:
        dt = F.softplus(dt.float() + self.dt_bias.float())
        low, high = self.settings.dt_range
        return dt.clamp(min=low, max=high) if floor else dt

    def _A(self) -> torch.Tensor:
        return -torch.exp(self.A_log.float())

    def _mix(self, hidden_states: torch.Tensor, runs: torch.Tensor | None, conv_tail: bool = False,
             fixups: ConvFixups | None = None):
        s = self.settings
        zxbcdt, _ = self.in_proj(hidden_states)  # [s, b, in_proj rows]; gathered under SP
        seq, batch = zxbcdt.shape[:2]
        z, xbc, dt = swap_first_dims(zxbcdt).split([self.d_inner, self.conv_dim, self.heads], dim=-1)
        xbc_in = xbc.transpose(1, 2)  # [b, channels, s]
        conv = causal_conv1d(xbc_in, self.conv1d.weight, self.conv1d.bias, runs, fixups)
        xbc = F.silu(conv).transpose(1, 2)
        x, B, C = xbc.split(s.conv_sizes(self.config.tensor_model_parallel_size), dim=-1)
        x = x.reshape(batch, seq, self.heads, s.head_dim)
        B = B.reshape(batch, seq, self.groups, s.d_state)
        C = C.reshape(batch, seq, self.groups, s.d_state)
        needs_grad = torch.is_grad_enabled() and zxbcdt.requires_grad
        if not conv_tail and ssd_triton.available(x.device, needs_grad, x.dtype):  # Triton kernels (fla-core)
            y, ssm_state = ssd_triton.triton_scan(x, self._dt(dt), self._A(), B, C, runs), None
        elif needs_grad and not conv_tail:
            y, ssm_state = recomputed_ssd_scan(x, self._dt(dt), self._A(), B, C, s.chunk_size, runs), None
        else:
            y, ssm_state = ssd_scan(x, self._dt(dt), self._A(), B, C, s.chunk_size, runs)
        out = self._output(y, x, z, hidden_states.dtype)
        if not conv_tail:
            return out, None, None
        keep = s.d_conv - 1
        tail = F.pad(xbc_in, (keep, 0))[..., seq:]
        if runs is not None:  # only the last run's inputs, as if it had started the row
            tail = tail * (F.pad(runs, (keep, 0), value=-1)[:, seq:] == runs[:, -1:])[:, None]
        return out, tail, ssm_state

    def _output(self, y: torch.Tensor, x: torch.Tensor, z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """D skip, gated norm and ``out_proj`` of scan outputs ``y`` ``[b, s, heads, head_dim]``."""
        out, _ = self.out_proj(swap_first_dims(self.norm(y, x, self.D, z).to(dtype)))
        return out

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None) -> dict:
        """Checkpoint keys as Megatron's MambaMixer writes them: rank-local tensors TP-sharded on
        dim 0, and ``in_proj`` / ``conv1d`` saved per part (``in_proj.weight.z`` ... ``.dt``,
        ``conv1d.weight.x`` ...), so a checkpoint loads at any TP that divides heads and groups."""
        from megatron.core.ssm.mamba_mixer import _split_tensor_factory
        from megatron.core.transformer.utils import (
            ensure_metadata_has_dp_cp_group,
            make_sharded_tensors_for_checkpoint,
        )

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        pgs = dict(tp_group=parallel_state.get_tensor_model_parallel_group(),
                   dp_cp_group=metadata["dp_cp_group"])
        out = make_sharded_tensors_for_checkpoint(
            {"dt_bias": self.dt_bias, "A_log": self.A_log, "D": self.D}, prefix,
            {"dt_bias": 0, "A_log": 0, "D": 0}, sharded_offsets, **pgs,
        )
        for name, module in (("conv1d", self.conv1d), ("norm", self.norm)):
            local = module.state_dict(prefix="", keep_vars=True)
            out.update(make_sharded_tensors_for_checkpoint(
                local, f"{prefix}{name}.", dict.fromkeys(local, 0), sharded_offsets, **pgs))
        for name in ("in_proj", "out_proj"):
            out.update(getattr(self, name).sharded_state_dict(f"{prefix}{name}.", sharded_offsets, metadata))
        tp = self.config.tensor_model_parallel_size
        splits = {"in_proj": (self.settings.in_proj_sizes(tp), ["z", "x", "B", "C", "dt"]),
                  "conv1d": (self.settings.conv_sizes(tp), ["x", "B", "C"])}
        # Matched on the checkpoint key, not the dict key: a LoRA/DoRA wrapper keeps its base under
        # ``in_proj.base_layer.weight`` in the dict while the key stays ``in_proj.weight``, and adds
        # row-sharded ``lora_B`` / ``lora_magnitude`` that split like the weight.
        wanted = {f"{prefix}{module}.{tensor}": split for module, split in splits.items()
                  for tensor in ("weight", "bias", "lora_B", "lora_magnitude")}
        for name, sharded in list(out.items()):
            split = wanted.get(getattr(sharded, "key", None))
            if split is not None:
                out[name] = _split_tensor_factory(sharded, *split, 0)
        return out
