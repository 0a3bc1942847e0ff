"""Activation recomputation of whole layers, for every component or only some.

torch's non-reentrant checkpoint instead of Megatron's ``recompute_granularity``: Megatron saves
every layer argument with ``save_for_backward``, which rejects our structural ``AttentionMask``.
A recomputed layer keeps only its inputs between forward and backward and runs its forward again
in the backward.

Components are the family's (``model.component_prefixes``): recomputing just ``vision`` keeps the
language model's activations (cheap to keep, costly to recompute per image token) and drops the
vision tower's, which dominate a step's activations when a micro-batch holds many image patches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch


def _layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Every transformer layer (LM and ViT) and every decoder layer whatever its class (a hybrid
    stack's Mamba layers are not TransformerLayers), in model order."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    decoder = getattr(getattr(model, "language_model", None), "decoder", None)
    decoder_layers = {id(m) for m in getattr(decoder, "layers", [])}
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, TransformerLayer) or id(module) in decoder_layers]


def _component(name: str, components: dict[str, tuple[str, ...]]) -> str | None:
    for component, prefixes in components.items():
        if f"{name}.".startswith(prefixes):
            return component
    return None


def layers_to_recompute(model: torch.nn.Module, components: Sequence[str] = (),
                        first_layers: int = 0) -> list[str]:
    """Names of the layers to recompute: those of ``components`` (all when empty), the first
    ``first_layers`` of each component on this rank (all when 0). Unknown components, and one
    that holds no layer at all, are refused by name."""
    declared = dict(getattr(model, "component_prefixes", None) or {})
    unknown = [c for c in components if c not in declared]
    if unknown:
        raise ValueError(f"recompute_components: {', '.join(unknown)} is not a component of this model "
                         f"(known: {', '.join(sorted(declared))})")
    by_component: dict[str | None, list[str]] = {}
    for name, _ in _layers(model):
        by_component.setdefault(_component(name, declared), []).append(name)
    held = {c for c in components for n, _ in model.named_parameters() if n.startswith(declared[c])}
    empty = [c for c in components if c in held and not by_component.get(c)]
    if empty:
        raise ValueError(f"recompute_components: {', '.join(empty)} holds no transformer layer to recompute")
    chosen = [by_component.get(c, []) for c in components] if components else list(by_component.values())
    return [name for names in chosen for name in (names[:first_layers] if first_layers else names)]


def _contexts() -> tuple:
    """Forward as it is; the recomputation in the backward under the CPU layer when it is on."""
    from vlm_bridge.compat.cpu import cpu_mode_for_recompute

    return contextlib.nullcontext(), cpu_mode_for_recompute()


def apply_recompute(model: torch.nn.Module, components: Sequence[str] = (),
                    first_layers: int = 0) -> list[str]:
    """Wrap the chosen layers' forward in a non-reentrant checkpoint (training only); returns the
    wrapped layers' names."""
    from torch.utils.checkpoint import checkpoint

    names = layers_to_recompute(model, components, first_layers)
    for name in names:
        module = model.get_submodule(name)
        forward = module.forward

        def checkpointed(*args, _forward=forward, _module=module, **kwargs):
            if not _module.training:
                return _forward(*args, **kwargs)
            return checkpoint(_forward, *args, use_reentrant=False, context_fn=_contexts, **kwargs)

        module.forward = checkpointed
    return names


def layers_kept_whole(model: torch.nn.Module, recomputed: Sequence[str]) -> list[torch.nn.Module]:
    """The layers whose forward is not recomputed (where finer recomputation can save memory)."""
    skip = set(recomputed)
    return [module for name, module in _layers(model) if name not in skip]
