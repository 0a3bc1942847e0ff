"""LoRA / DoRA adapters put on a *built* Megatron model, TP-aware, without touching model classes.

:func:`apply_lora` swaps matching ``ColumnParallelLinear`` / ``RowParallelLinear`` submodules for
:class:`~vlm_bridge.peft.layer.LoraLinear` wrappers (the base layer stays inside as ``base_layer``;
its torch_dist checkpoint keys are unchanged, adapters add ``<module>.lora_{A,B,magnitude}``) and
freezes every base parameter. Freeze flags combine: call ``apply_lora`` first, then set
``requires_grad`` on whatever else should train (e.g. the projector); a later ``apply_lora`` is
refused rather than silently re-freezing.

Components (``language_model``, ``vision``, ``projector``) select modules by the parameter-name
prefixes the model's family declares (``model.component_prefixes``, set when the model is built);
targets by the leaf name (``linear_qkv``, ``linear_proj``, ``linear_fc1``, ``linear_fc2``); routed
MoE experts are never adapted (see :func:`apply_lora`). Names returned and used as keys are global
(decoder layers numbered across pipeline stages).

:func:`merge_lora` folds adapters into the base weights (keeping a copy of each base weight) and
:func:`unmerge_lora` restores them bit-exactly; merged modules run the base layer only (for
inference / export, not training).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.moe.experts import SequentialMLP

from vlm_bridge.convert.distribute import shard
from vlm_bridge.parallel import unwrap_model
from vlm_bridge.peft.config import (
    ALL_LINEAR,
    HF_TARGET_NAMES,
    MEGATRON_TARGET_NAMES,
    LoraConfig,
    megatron_targets,
)
from vlm_bridge.peft.layer import LoraLinear, full_shape, seeded

__all__ = ["LoraConfig", "apply_lora", "lora_modules", "adapter_state_dict", "merge_lora", "unmerge_lora"]

_LAYER = re.compile(r"^(language_model\.decoder\.layers\.)(\d+)\.")


def _global_name(model: torch.nn.Module):
    """Local module name -> global one (decoder layers numbered across pipeline stages)."""
    decoder = getattr(getattr(model, "language_model", None), "decoder", None)
    offsets = {str(i): lay.layer_number - 1 for i, lay in enumerate(decoder.layers)} if decoder else {}

    def to_global(name: str) -> str:
        match = _LAYER.match(name + ".")
        if not match:
            return name
        return f"{match.group(1)}{offsets[match.group(2)]}.{name[match.end():]}".rstrip(".")

    return to_global


def apply_lora(model: torch.nn.Module, cfg: LoraConfig,
               components: Mapping[str, tuple[str, ...]] | None = None) -> list[str]:
    """Wrap matching parallel linears in place, freeze all base parameters; global names wrapped.

    ``components`` maps component names to parameter-name prefixes (default: the family's, from
    ``model.component_prefixes``).
    """
    model = unwrap_model(model)
    components = components if components is not None else getattr(model, "component_prefixes", None)
    if components is None:
        raise ValueError("apply_lora: the model declares no components; pass components=")
    unknown = set(cfg.components) - set(components)
    if unknown:
        raise ValueError(f"unknown LoRA components {sorted(unknown)}; known: {sorted(components)}")
    if lora_modules(model):
        raise ValueError("apply_lora: the model already has LoRA adapters")
    prefixes = tuple(p for c in cfg.components for p in components[c])
    to_global = _global_name(model)
    for p in model.parameters():
        p.requires_grad_(False)
    # Routed MoE experts are never adapted: they run as grouped GEMMs (a wrapped expert falls back
    # to one matmul chain per expert, ~10x slower steps at 128 experts), their linears skip the TP
    # reduction an adapter's row-parallel path does, and HF stores them as fused 3-D tensors that a
    # PEFT LoRA module cannot target. ``linear_fc1``/``linear_fc2`` then match dense MLPs only.
    experts = {id(m) for e in model.modules() if isinstance(e, SequentialMLP) for m in e.modules()}
    linears = [(name, module) for name, module in model.named_modules()
               if isinstance(module, (ColumnParallelLinear, RowParallelLinear))
               and name.startswith(prefixes) and id(module) not in experts]
    leaves = {name.rsplit(".", 1)[-1] for name, _ in linears}
    unknown = [t for t in cfg.targets if t not in leaves and t != ALL_LINEAR
               and t not in HF_TARGET_NAMES and t not in MEGATRON_TARGET_NAMES]
    if unknown:  # a typo among good names would otherwise just adapt fewer layers
        raise ValueError(f"peft.targets: {', '.join(unknown)} names no linear layer; "
                         f"{_target_names_offered(leaves)}")
    targets = megatron_targets(cfg.targets)
    matches = [(name, module) for name, module in linears
               if name.rsplit(".", 1)[-1] in targets
               or (ALL_LINEAR in targets and name.rsplit(".", 1)[-1] != "output_layer")]
    # A component this rank holds (pipeline stages hold some only) that offers nothing to adapt.
    held = {c for c in cfg.components for n, _ in model.named_parameters() if n.startswith(components[c])}
    empty = [c for c in cfg.components
             if c in held and not any(n.startswith(components[c]) for n, _ in matches)]
    if empty:
        in_empty = tuple(p for c in empty for p in components[c])
        names = {name.rsplit(".", 1)[-1] for name, _ in linears if name.startswith(in_empty)}
        offered = _target_names_offered(names) if names - {"output_layer"} else \
            "they hold no linear layer; train them fully with freeze.<component>=false instead"
        raise ValueError(f"peft.targets={','.join(cfg.targets)} names no linear layer of the LoRA "
                         f"components {empty} in this model: {offered}")
    wrapped = []
    for name, module in matches:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        glu = leaf == "linear_fc1" and isinstance(parent, MLP) and parent.config.gated_linear_unit
        # A fused projection of unequal parts (Mamba's in_proj) declares them; a GLU fc1 has two.
        chunks = getattr(module, "tp_parts", None) or (2 if glu else 1)
        setattr(parent, leaf, LoraLinear(module, cfg, to_global(name), tp_chunks=chunks))
        wrapped.append(to_global(name))
    return wrapped


def _target_names_offered(leaves: set[str]) -> str:
    names = ", ".join(sorted(leaves - {"output_layer"}))
    hf = ", ".join(n for n, m in HF_TARGET_NAMES.items() if m in leaves)
    return f"the linear layers here are named {names} ({hf} as transformers names them), or {ALL_LINEAR}"


def lora_modules(model: torch.nn.Module) -> dict[str, LoraLinear]:
    """``{global module name: LoraLinear}`` on this rank."""
    model = unwrap_model(model)
    to_global = _global_name(model)
    return {to_global(n): m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


def adapter_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """This rank's adapter tensors (local TP shards), keyed ``<global module>.lora_{A,B,magnitude}``."""
    return {
        f"{name}.{p_name}": p.detach()
        for name, mod in lora_modules(model).items()
        for p_name, p in mod.adapter_parameters().items()
    }


def merge_lora(model: torch.nn.Module) -> None:
    for mod in lora_modules(model).values():
        mod.merge()


def fold_lora(model: torch.nn.Module) -> int:
    """Merge every adapter into its base weight for good and put the base layer back in its place:
    a PEFT checkpoint becomes the plain model a new PEFT run adapts. Returns how many it folded."""
    model = unwrap_model(model)
    wrapped = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, LoraLinear)]
    for name, mod in wrapped:
        mod.merge()
        mod._saved_weight = None  # no unmerge: the merged weight is the model now
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, mod.base_layer)
    return len(wrapped)


def unmerge_lora(model: torch.nn.Module) -> None:
    for mod in lora_modules(model).values():
        mod.unmerge()


@torch.no_grad()
def randomize_adapters_(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> None:
    """Deterministic nonzero adapters for tests: full tensors from (seed, name), then sharded.

    ``lora_A`` / ``lora_B`` become ``std * N(0, 1)`` (the same values at any TP); a DoRA magnitude
    is multiplied by ``1 + std * N(0, 1)``.
    """
    for name, mod in lora_modules(model).items():
        for p_name, p in mod.adapter_parameters().items():
            full = torch.randn(full_shape(p), generator=seeded(f"{name}.{p_name}", seed + 1)) * std
            local = shard(full, p, mod.tp_chunks).to(device=p.device, dtype=p.dtype)
            if p_name == "lora_magnitude":
                p.mul_(1 + local)
            else:
                p.copy_(local)
