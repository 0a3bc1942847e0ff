"""Megatron LoRA / DoRA adapters -> an HF PEFT adapter folder (``PeftModel.from_pretrained`` loads it).

Each wrapped module ``<m>`` has a family table entry ``<m>.weight`` telling which HF tensors it is
made of and by which op. ``lora_B`` has the weight's rows, so the entry's op is applied to the full
(TP-gathered) ``B`` as if it were the weight (FuseQKV splits q/k/v or reorders the HF-fused vision
qkv, ConcatRows splits gate/up); ``lora_A`` acts on the shared input, so it is copied to every HF
module of the entry; a DoRA magnitude is per output row, so it is converted like a bias.

Keys are those ``peft`` writes for a LoRA on the loaded transformers model::

    base_model.model.<module path>.lora_A.weight          [r, in]
    base_model.model.<module path>.lora_B.weight          [out, r]
    base_model.model.<module path>.lora_magnitude_vector  [out]      (DoRA)

where ``<module path>`` is the in-memory name (e.g. ``model.language_model.layers.0.self_attn.q_proj``),
not the hub checkpoint key: the family declares how its hub names map (``hf_module_prefixes``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from vlm_bridge.convert.distribute import gather
from vlm_bridge.convert.hf_io import atomic_output_dir
from vlm_bridge.convert.ops import Transpose
from vlm_bridge.parallel import cpu_group
from vlm_bridge.peft.lora import LoraConfig, lora_modules


def _local_hf_tensors(built) -> tuple[dict[str, torch.Tensor], LoraConfig | None, list[str]]:
    """HF-PEFT tensors of this pipeline stage (non-empty on TP rank 0 only; all TP ranks gather),
    and the HF parameters adapted directly (PEFT ``target_parameters``)."""
    by_name = {e.megatron: e for e in built.table}
    keep = parallel_state.get_tensor_model_parallel_rank() == 0
    out: dict[str, torch.Tensor] = {}
    parameters: list[str] = []
    cfg = None
    for name, mod in sorted(lora_modules(built.model).items()):
        entry = by_name.get(f"{name}.weight")
        if entry is None:
            raise KeyError(f"{name}: no weight-table entry {name}.weight to export the adapter with")
        chunks = entry.op.tp_chunks
        assert chunks == mod.tp_chunks, f"{name}: table splits it in {chunks}, the model in {mod.tp_chunks}"
        full = {n: gather(p.data, p, chunks).cpu() for n, p in mod.adapter_parameters().items()}
        if not keep:
            continue
        cfg = mod.cfg
        if isinstance(entry.op, Transpose):
            out.update(_parameter_adapter(built, name, entry.hf[0], full))
            parameters.append(built.family.hf_module_path(entry.hf[0]) + "." + entry.hf[0].rsplit(".", 1)[1])
            continue
        per_row = {"lora_B.weight": entry.op.to_hf(full["lora_B"])}
        if "lora_magnitude" in full:
            per_row["lora_magnitude_vector"] = entry.op.to_hf(full["lora_magnitude"])
        for i, hf_name in enumerate(entry.hf):
            path = "base_model.model." + built.family.hf_module_path(hf_name)
            out[f"{path}.lora_A.weight"] = full["lora_A"].clone()
            for key, tensors in per_row.items():
                out[f"{path}.{key}"] = tensors[i].clone().contiguous()
    return out, cfg, parameters


def check_exportable(built) -> None:
    """Raise before a run trains what :func:`export_hf_peft` would raise at its end: DoRA on a bare
    HF matrix (PEFT adapts a parameter with plain LoRA only)."""
    by_name = {e.megatron: e for e in built.table}
    for name, mod in sorted(lora_modules(built.model).items()):
        entry = by_name.get(f"{name}.weight")
        if entry is not None and isinstance(entry.op, Transpose) and mod.use_dora:
            raise ValueError(_dora_on_parameter(name, entry.hf[0]))


def _dora_on_parameter(name: str, hf_name: str) -> str:
    return (f"{name}: DoRA on {hf_name} has no HF-PEFT adapter form (PEFT adapts that parameter "
            "with plain LoRA only), so the run's adapter cannot be exported; use peft.method=lora or "
            "leave that component out (`export` of the run still writes the merged HF model)")


def _parameter_adapter(built, name: str, hf_name: str, full: dict) -> dict[str, torch.Tensor]:
    """A bare HF matrix ``W`` used as ``x @ W`` (stored as our Linear's transpose): PEFT adapts it
    as a parameter, ``W + s B' A'`` with ``B' = A^T`` and ``A' = B^T`` of our ``W^T + s B A``."""
    if "lora_magnitude" in full:
        raise ValueError(_dora_on_parameter(name, hf_name))
    path = "base_model.model." + built.family.hf_module_path(hf_name)
    return {f"{path}.lora_A.weight": full["lora_B"].t().contiguous(),
            f"{path}.lora_B.weight": full["lora_A"].t().contiguous()}


def peft_config(cfg: LoraConfig, target_modules: list[str], base_model_name_or_path: str,
                target_parameters: list[str] | None = None):
    """The ``peft.LoraConfig`` matching our adapters (exact module and parameter paths as targets)."""
    import peft

    alpha = int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha
    return peft.LoraConfig(
        r=cfg.rank, lora_alpha=alpha, lora_dropout=cfg.dropout, target_modules=target_modules,
        target_parameters=target_parameters or None, use_dora=cfg.use_dora, bias="none",
        task_type=None, inference_mode=True, base_model_name_or_path=base_model_name_or_path,
    )


def base_model_reference(name_or_path: str) -> str:
    """What the adapter's config names as its base model: a hub name as given, the snapshot of the
    Hugging Face cache that its ``refs/main`` names (what a hub id resolves to) as its hub id (the
    adapter then loads on any machine, as PEFT's own adapters do), and any other local folder, an
    older snapshot included, as an absolute path (found from any working directory)."""
    folder = Path(name_or_path).expanduser()
    if not folder.is_dir():
        return name_or_path
    parts = folder.absolute().parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        main = folder.absolute().parent.parent / "refs" / "main"
        if main.is_file() and main.read_text().strip() == parts[-1]:  # the hub id means this revision
            return parts[-3].removeprefix("models--").replace("--", "/")
    return str(folder.resolve())


def export_hf_peft(built, out_dir: str | Path, base_model_name_or_path: str) -> None:
    """Run on every rank: write ``adapter_config.json`` + ``adapter_model.safetensors`` (rank 0)."""
    from safetensors.torch import save_file

    local = _local_hf_tensors(built)
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, local, group=cpu_group())
    if dist.get_rank() == 0:
        tensors: dict[str, torch.Tensor] = {}
        cfg, parameters = None, []
        for part, part_cfg, part_parameters in everyone:
            tensors.update(part)
            cfg = cfg or part_cfg
            parameters += part_parameters
        if cfg is None:
            raise ValueError("export_hf_peft: the model has no LoRA adapters")
        owners = {p.rsplit(".", 1)[0] for p in parameters}
        targets = sorted({k.removeprefix("base_model.model.").split(".lora_")[0] for k in tensors} - owners)
        config = peft_config(cfg, targets, base_model_reference(base_model_name_or_path),
                             sorted(parameters)).to_dict()
        # As peft's save_pretrained writes it, with sets sorted so that every run writes the same file.
        config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
        with atomic_output_dir(out_dir, overwrite=True) as out:  # complete or absent, never half
            save_file(dict(sorted(tensors.items())), out / "adapter_model.safetensors",
                      metadata={"format": "pt"})
            (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    dist.barrier(group=cpu_group())
