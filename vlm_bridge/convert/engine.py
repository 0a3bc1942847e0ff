"""HF safetensors <-> Megatron-Core distributed checkpoint, streaming, exhaustive and loud.

Import (on every rank of a TP x PP layout): check the HF tensors against the family table (each used
exactly once, names and shapes), build this rank's model, fill each parameter from the tensors of
its table entry (read lazily, converted, sharded), then write a ``torch_dist`` checkpoint, which
Megatron-Core can load at any other layout. Export reverses it: load the checkpoint into a model at
the requested layout, gather each parameter across TP, invert its table op, and stream the HF
tensors to rank 0, which writes sharded safetensors. Peak memory per rank is its model shard plus
one table entry (plus the output shard buffer on rank 0).

Layout of a Megatron checkpoint directory written here::

    <dir>/vlm_bridge.json   family, dtype, key layout, saved TP/PP
    <dir>/hf/               the HF config, tokenizer and processor files (for export and verify)
    <dir>/weights/          the torch_dist checkpoint
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from tqdm import tqdm

from vlm_bridge.convert.distribute import gather, global_param_names, shard
from vlm_bridge.convert.experts import (
    PER_EXPERT,
    ExpertFusingWriter,
    ExpertSplitReader,
    detect_expert_layout,
)
from vlm_bridge.convert.hf_io import (
    CheckpointError,
    SafetensorsReader,
    ShardedSafetensorsWriter,
    atomic_output_dir,
    copy_hf_side_files,
)
from vlm_bridge.convert.layout import KeyLayout, detect_layout, layout_by_name
from vlm_bridge.convert.ops import Entry
from vlm_bridge.families.base import Family
from vlm_bridge.parallel import ParallelConfig, cpu_group, device, init_distributed
from vlm_bridge.registry import family_for_config

META_FILE = "vlm_bridge.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TIED_OUTPUT = "language_model.output_layer.weight"
TIED_SOURCE = "language_model.embedding.word_embeddings.weight"


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


@dataclass
class BuiltModel:
    """A model for this rank plus everything needed to convert it."""

    family: Family
    hf_config: object
    settings: object
    model: torch.nn.Module
    table: list[Entry]
    params: dict[str, torch.nn.Parameter]
    key_layout: str = "hub"  # on-disk layout of the HF source, reproduced on export
    hf_side_dir: str = ""  # folder with config, tokenizer and processor files
    expert_layout: str = PER_EXPERT  # how MoE experts are stored on disk (convert/experts.py)

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.params.values())).dtype


def load_hf_config(folder: str | Path):
    from transformers import AutoConfig

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: no config.json (not a Hugging Face model folder)")
    return AutoConfig.from_pretrained(folder, local_files_only=True)


def build_rank_model(hf_config, dtype: torch.dtype, parallel: ParallelConfig) -> BuiltModel:
    """This rank's Megatron model (pre/post-process by pipeline stage) and the family table."""
    family = family_for_config(hf_config)
    language, vision, settings = family.build_configs(
        hf_config, dtype, parallel.tp, parallel.pp, parallel.ep
    )
    model = family.build_model(
        language, vision, settings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )
    # Plain torch submodules (patch embedding, torch norms) start on the CPU in fp32.
    model.to(device=device(), dtype=dtype)
    table = family.weight_table(language, vision, settings)
    return BuiltModel(family, hf_config, settings, model, table, global_param_names(model))


def _entry_for(built: BuiltModel) -> dict[str, Entry]:
    by_name = {e.megatron: e for e in built.table}
    if TIED_OUTPUT in built.params and TIED_OUTPUT not in by_name:
        # Tied embeddings under PP: the last stage holds its own copy of the embedding matrix.
        by_name[TIED_OUTPUT] = by_name[TIED_SOURCE]
    return by_name


def check_coverage(table: list[Entry], file_keys: list[str], layout: KeyLayout, where: str) -> None:
    """Every HF tensor used exactly once by the table and every table tensor present."""
    wanted = [layout.to_file(n) for e in table for n in e.hf]
    dupes = sorted({n for n in wanted if wanted.count(n) > 1})
    assert not dupes, f"weight table uses {dupes[:5]} more than once"
    missing = sorted(set(wanted) - set(file_keys))
    extra = sorted(set(file_keys) - set(wanted))
    if missing:
        raise CheckpointError(
            f"{where}: {len(missing)} tensor(s) missing from the checkpoint: {', '.join(missing[:8])}"
        )
    if extra:
        raise CheckpointError(
            f"{where}: {len(extra)} unexpected tensor(s) the {layout.name} layout does not use: "
            f"{', '.join(extra[:8])}"
        )


def _check_local_coverage(built: BuiltModel, by_name: dict[str, Entry]) -> None:
    unknown = sorted(set(built.params) - set(by_name))
    assert not unknown, f"Megatron parameters without a table entry: {unknown[:8]}"


def _progress(items, desc: str, enabled: bool):
    return tqdm(items, desc=desc, unit="tensor", disable=not enabled or bool(os.environ.get("CI")))


def _convert_and_shard(entry: Entry, tensors: list[torch.Tensor], param, src: str) -> torch.Tensor:
    """Table op + TP shard for one parameter; any shape mismatch is a one-line CheckpointError."""
    shapes = ", ".join(f"{n} {tuple(t.shape)}" for n, t in zip(entry.hf, tensors))
    try:
        local = shard(entry.op.to_megatron(tensors), param, entry.op.tp_chunks)
    except (RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{src}: wrong shape for {shapes} ({exc})") from None
    if tuple(local.shape) != tuple(param.shape):
        raise CheckpointError(
            f"{src}: wrong shape for {shapes}: gives {tuple(local.shape)} per rank, "
            f"the model expects {tuple(param.shape)}"
        )
    return local


def fill_from_hf(built: BuiltModel, reader: SafetensorsReader, layout: KeyLayout, src: str) -> None:
    """Load this rank's parameters from HF tensors; every shape is checked before any is read."""
    by_name = _entry_for(built)
    _check_local_coverage(built, by_name)
    plan = [(param, by_name[name]) for name, param in built.params.items()]
    for param, entry in plan:  # shapes from the headers only, on the meta device
        files = [layout.to_file(n) for n in entry.hf]
        metas = [torch.empty(reader.shape(f), dtype=reader.dtype(f), device="meta") for f in files]
        _convert_and_shard(entry, metas, param, src)
    for param, entry in _progress(plan, "import", dist.get_rank() == 0):
        tensors = [reader.get(layout.to_file(n)) for n in entry.hf]
        with torch.no_grad():
            param.copy_(_convert_and_shard(entry, tensors, param, src).to(param.dtype))


def import_hf(
    hf_dir: str, out_dir: str, parallel: ParallelConfig, dtype_arg: str | None, overwrite: bool
) -> dict:
    """Run on every rank: convert an HF folder into a Megatron distributed checkpoint."""
    init_distributed(parallel)
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise CheckpointError(f"output directory {out} already exists; pass --overwrite to replace it")
    built = load_hf(hf_dir, parallel, DTYPES[dtype_arg] if dtype_arg else None)
    meta = {
        "family": built.family.name,
        "dtype": dtype_name(built.dtype),
        "key_layout": built.key_layout,
        "expert_layout": built.expert_layout,
        "saved_tp": parallel.tp,
        "saved_pp": parallel.pp,
        "saved_ep": parallel.ep,
    }
    save_megatron(built.model, out, meta, hf_dir, overwrite)
    return meta


def save_megatron(model, out: Path, meta: dict, hf_side_dir: str | Path, overwrite: bool) -> None:
    """Write ``model`` as a torch_dist checkpoint, atomically (rank 0 owns the rename)."""
    holder: list = [None]
    ctx = atomic_output_dir(out, overwrite=overwrite) if dist.get_rank() == 0 else None
    try:
        if ctx is not None:
            holder[0] = str(ctx.__enter__())
        dist.broadcast_object_list(holder, src=0, group=cpu_group())
        tmp = Path(holder[0])
        if dist.get_rank() == 0:
            (tmp / "weights").mkdir()
            copy_hf_side_files(hf_side_dir, tmp / "hf")
        dist.barrier()
        dist_checkpointing.save(_state_dict_consuming(model), str(tmp / "weights"))
        dist.barrier()
        if ctx is not None:
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
            ctx.__exit__(None, None, None)
            ctx = None
    finally:
        if ctx is not None:
            import sys

            ctx.__exit__(*sys.exc_info())


def _state_dict_consuming(model) -> dict:
    """The model's sharded state dict with views copied out and their parameters freed.

    Megatron splits fused GLU weights into views for the checkpoint, and its writer clones CPU
    views before writing, all at once: on a CPU import that is a second copy of every fc1 (about
    45% of a dense LM). The model is discarded after an import, so copy each view and free its
    parameter right away: peak memory stays at one model plus one parameter.
    """
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    sd = model.sharded_state_dict()
    apply_factories(sd)
    by_storage: dict[int, list] = {}
    for item in nested_values(sd):
        if isinstance(item, ShardedTensor) and item.data is not None and item.data.device.type == "cpu":
            by_storage.setdefault(item.data.untyped_storage().data_ptr(), []).append(item)
    for param in model.parameters():
        items = by_storage.get(param.untyped_storage().data_ptr(), [])
        if any(it.data.numel() != param.numel() for it in items):
            for it in items:
                it.data = it.data.detach().clone()
            param.data = torch.empty(0, dtype=param.dtype)
    return sd


def read_meta(megatron_dir: str | Path) -> dict:
    path = Path(megatron_dir) / META_FILE
    if not path.is_file():
        raise CheckpointError(f"{megatron_dir}: no {META_FILE} (not a vlm-bridge Megatron checkpoint)")
    return json.loads(path.read_text())


def load_megatron(megatron_dir: str, parallel: ParallelConfig, dtype: torch.dtype | None = None):
    """Build this rank's model at ``parallel`` and load a checkpoint saved at any layout."""
    meta = read_meta(megatron_dir)
    hf_config = load_hf_config(Path(megatron_dir) / "hf")
    dtype = dtype or DTYPES[meta["dtype"]]
    built = build_rank_model(hf_config, dtype, parallel)
    built.key_layout, built.hf_side_dir = meta["key_layout"], str(Path(megatron_dir) / "hf")
    built.expert_layout = meta.get("expert_layout", PER_EXPERT)
    peft = meta.get("peft")
    if peft:  # a LoRA/DoRA training checkpoint: load the adapters too and fold them in
        from vlm_bridge.peft.lora import LoraConfig, apply_lora, merge_lora

        apply_lora(built.model, LoraConfig(
            rank=peft["rank"], alpha=peft["alpha"], targets=tuple(peft["targets"]),
            components=tuple(peft["components"]), use_dora=peft["method"] == "dora"))
    load_in_place(built.model, f"{megatron_dir}/weights")
    if peft:
        merge_lora(built.model)
    return built, meta


def load_in_place(model, weights_dir: str) -> None:
    """Read a torch_dist checkpoint straight into the model's parameters.

    Megatron's factories (fused GLU weights) would otherwise load into fresh tensors and
    concatenate them, a second copy of every fc1 before ``load_state_dict``; applied up front,
    their pieces are views of the parameters and the reader fills those views directly. Keys
    live in the sharded tensors, not the dict nesting, so this also reads the model out of a
    training checkpoint (which holds optimizer state besides).
    """
    from megatron.core.dist_checkpointing.mapping import apply_factories

    sd = model.sharded_state_dict()
    apply_factories(sd)
    dist_checkpointing.load(sd, weights_dir)


def open_hf_weights(hf_dir: str, hf_config) -> tuple:
    """The folder's tensors, with fused MoE experts presented per expert; and their layout."""
    reader = SafetensorsReader(hf_dir)
    text = getattr(hf_config, "text_config", hf_config)
    expert_layout = detect_expert_layout(reader, text.hidden_size)
    if expert_layout != PER_EXPERT:
        reader = ExpertSplitReader(reader, expert_layout)
    return reader, expert_layout


def load_hf(hf_dir: str, parallel: ParallelConfig, dtype: torch.dtype | None) -> BuiltModel:
    """Build this rank's model and fill it from an HF folder (conversion on the fly).

    ``dtype`` None keeps the checkpoint's own dtype.
    """
    hf_config = load_hf_config(hf_dir)
    family_for_config(hf_config)  # unsupported architectures fail before any file is opened
    reader, expert_layout = open_hf_weights(hf_dir, hf_config)
    built = build_rank_model(hf_config, dtype or reader.dtype(reader.keys()[0]), parallel)
    layout = detect_layout(built.family.layouts, reader.keys())
    check_coverage(built.table, reader.keys(), layout, hf_dir)
    fill_from_hf(built, reader, layout, hf_dir)
    built.key_layout, built.hf_side_dir = layout.name, str(hf_dir)
    built.expert_layout = expert_layout
    return built


def load_pretrained(path: str, parallel: ParallelConfig, dtype: torch.dtype | None) -> BuiltModel:
    """An HF folder or a vlm-bridge Megatron checkpoint, at this run's layout."""
    if not path:
        raise ValueError("no pretrained model given (--pretrained DIR)")
    if (Path(path) / META_FILE).is_file():
        return load_megatron(path, parallel, dtype)[0]
    return load_hf(path, parallel, dtype)


def _owners(built: BuiltModel) -> dict[str, int]:
    """Global rank that sends each table entry to rank 0 (TP rank 0 of the stage that holds it)."""
    mine = [e.megatron for e in built.table if e.megatron in built.params]
    if parallel_state.get_tensor_model_parallel_rank() != 0:
        mine = []
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine, group=cpu_group())
    owners: dict[str, int] = {}
    for rank, names in enumerate(everyone):  # lowest rank wins: replicas over EP/DP are equal
        for name in names:
            owners.setdefault(name, rank)
    return owners


def _send_tensor(t: torch.Tensor, dst: int) -> None:
    header = torch.tensor([t.dim(), *t.shape, list(DTYPES.values()).index(t.dtype)])
    group = cpu_group()
    dist.send(torch.tensor([header.numel()]), dst, group=group)
    dist.send(header, dst, group=group)
    dist.send(t.cpu().contiguous(), dst, group=group)


def _recv_tensor(src: int) -> torch.Tensor:
    group = cpu_group()
    n = torch.empty(1, dtype=torch.long)
    dist.recv(n, src, group=group)
    header = torch.empty(int(n), dtype=torch.long)
    dist.recv(header, src, group=group)
    ndim = int(header[0])
    t = torch.empty(header[1:1 + ndim].tolist(), dtype=list(DTYPES.values())[int(header[-1])])
    dist.recv(t, src, group=group)
    return t


def export_hf(
    megatron_dir: str, hf_dir: str, parallel: ParallelConfig, dtype_arg: str | None,
    overwrite: bool, max_shard_bytes: int = 2 * 1024**3, expert_layout: str | None = None,
) -> dict:
    """Run on every rank: write an HF folder from a Megatron checkpoint (rank 0 writes)."""
    init_distributed(parallel)
    if Path(hf_dir).exists() and not overwrite:
        raise CheckpointError(f"output directory {hf_dir} already exists; pass --overwrite to replace it")
    built, meta = load_megatron(megatron_dir, parallel)
    out_dtype = DTYPES[dtype_arg or meta["dtype"]]
    if expert_layout:
        built.expert_layout = expert_layout
    write_hf(built, hf_dir, out_dtype, overwrite, max_shard_bytes, consume=True)
    return {"family": built.family.name, "dtype": dtype_name(out_dtype), "key_layout": built.key_layout}


def write_hf(built: BuiltModel, hf_dir: str | Path, out_dtype: torch.dtype, overwrite: bool,
             max_shard_bytes: int = 2 * 1024**3, consume: bool = False) -> None:
    """Run on every rank: stream this model to an HF folder; rank 0 writes.

    ``consume`` frees each parameter once it is handed to the writer (the export command discards
    the model anyway), so peak memory falls as the export proceeds instead of adding the output
    buffer on top of a full model.
    """
    layout = layout_by_name(built.family.layouts, built.key_layout)
    owners = _owners(built)
    rank = dist.get_rank()
    ctx = atomic_output_dir(Path(hf_dir), overwrite=overwrite) if rank == 0 else None
    tmp = ctx.__enter__() if ctx is not None else None
    try:
        writer = None
        if tmp is not None:
            experts = getattr(built.model.language_model.config, "num_moe_experts", None) or 0
            writer = ExpertFusingWriter(
                ShardedSafetensorsWriter(tmp, max_shard_bytes), built.expert_layout, experts
            )
        for entry in _progress(built.table, "export", rank == 0):
            full = None
            if entry.megatron in built.params:
                param = built.params[entry.megatron]
                full = gather(param.data, param, entry.op.tp_chunks)
            owner = owners[entry.megatron]
            if rank == owner and owner != 0:
                _send_tensor(full, 0)
            elif rank == 0:
                full = full if owner == 0 else _recv_tensor(owner)
                for name, t in zip(entry.hf, entry.op.to_hf(full)):
                    writer.add(layout.to_file(name), t.to(device="cpu", dtype=out_dtype))
            del full
            if consume and entry.megatron in built.params:
                built.params[entry.megatron].data = torch.empty(0)
        if rank == 0:
            writer.finalize()
            copy_hf_side_files(built.hf_side_dir, tmp)
            _write_config_dtype(tmp, out_dtype)
            ctx.__exit__(None, None, None)
            ctx = None
    finally:
        if ctx is not None:
            import sys

            ctx.__exit__(*sys.exc_info())
    dist.barrier(group=cpu_group())


def _write_config_dtype(folder: Path, dtype: torch.dtype) -> None:
    """Record the exported dtype in config.json, as transformers does when it saves."""
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    name = str(dtype).removeprefix("torch.")
    for key in ("dtype", "torch_dtype"):
        if key in cfg:
            cfg[key] = name
    path.write_text(json.dumps(cfg, indent=2) + "\n")
