"""HF safetensors <-> Megatron-Core distributed checkpoint, streaming, exhaustive and loud.

This module knows no family and no PEFT: it converts a rank's parameters (global name ->
parameter) through a weight table; ``vlm_bridge.loading`` builds models and runs the commands.

Import (on every rank of a TP x PP layout): check the HF tensors against the family table (each used
exactly once, names and shapes), build this rank's model without filling it, and write a
``torch_dist`` checkpoint (which Megatron-Core can load at any other layout) whose writer converts
each parameter from its table entry (read lazily, converted, sharded) when it reaches it. Export
reverses it: build the model at the requested layout, read a batch of table entries' parameters
from the checkpoint, gather each across TP, invert its table op, and stream the HF tensors to rank
0, which writes them into sharded safetensors as they come; each parameter is freed once written.
Peak memory per rank is thus a few parameters and a read batch, not the model
(``convert.streaming``). ``fill_from_hf`` fills a whole model in memory instead (verify, training).

Layout of a Megatron checkpoint directory written here::

    <dir>/vlm_bridge.json   family, dtype, key layout, saved TP/PP
    <dir>/hf/               the HF config, tokenizer and processor files (for export and verify)
    <dir>/weights/          the torch_dist checkpoint
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from tqdm import tqdm

from vlm_bridge.convert.distribute import gather, is_tp_sharded, shard, tp_world_size
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
from vlm_bridge.convert.layout import KeyLayout
from vlm_bridge.convert.ops import Entry
from vlm_bridge.convert.read_ahead import Span
from vlm_bridge.convert.streaming import (
    CheckpointParams,
    ParameterProducer,
    StreamingSaveStrategy,
    checkpoint_read_errors,
)
from vlm_bridge.parallel import cpu_group

META_FILE = "vlm_bridge.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TIED_OUTPUT = "language_model.output_layer.weight"
TIED_SOURCE = "language_model.embedding.word_embeddings.weight"


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def _entry_for(params: dict, table: list[Entry]) -> dict[str, Entry]:
    by_name = {e.megatron: e for e in table}
    if TIED_OUTPUT in params and TIED_OUTPUT not in by_name:
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


def _check_local_coverage(params: dict, by_name: dict[str, Entry]) -> None:
    unknown = sorted(set(params) - set(by_name))
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


class HFParamSource:
    """This rank's parameter values converted from HF tensors through the table, one parameter at a
    time (``__call__(global name)``); every shape is checked from the file headers first."""

    def __init__(self, params: dict[str, torch.nn.Parameter], table: list[Entry],
                 reader: SafetensorsReader, layout: KeyLayout, src: str) -> None:
        self.params, self.reader, self.layout, self.src = params, reader, layout, src
        self.by_name = _entry_for(params, table)
        _check_local_coverage(params, self.by_name)
        for name, param in params.items():  # shapes from the headers only, on the meta device
            entry = self.by_name[name]
            files = [layout.to_file(n) for n in entry.hf]
            metas = [torch.empty(reader.shape(f), dtype=reader.dtype(f), device="meta") for f in files]
            _convert_and_shard(entry, metas, param, src)

    def __call__(self, name: str) -> torch.Tensor:
        entry = self.by_name[name]
        # Uncopied file views: every table op is out of place, and the result is written or copied
        # into the parameter at once, so a tensor that needs no conversion is read exactly once.
        tensors = [self.reader.get(self.layout.to_file(n), copy=False) for n in entry.hf]
        return _convert_and_shard(entry, tensors, self.params[name], self.src)

    def spans(self, name: str) -> list[Span]:
        """The file bytes this parameter is converted from (for reading them ahead)."""
        return [self.reader.span(self.layout.to_file(n)) for n in self.by_name[name].hf]

    def rows(self, name: str) -> list[torch.Tensor] | None:
        """For a parameter that is its HF tensors stacked along dim 0 (each TP-split on its own),
        this rank's piece of each, uncopied; None for any other op."""
        entry, param = self.by_name[name], self.params[name]
        if not entry.op.stacks_rows or (is_tp_sharded(param) and param.partition_dim != 0):
            return None
        return [shard(self.reader.get(self.layout.to_file(n), copy=False), param)
                for n in entry.hf]


def fill_from_hf(params: dict[str, torch.nn.Parameter], table: list[Entry], reader: SafetensorsReader,
                 layout: KeyLayout, src: str) -> None:
    """Load this rank's parameters (global name -> parameter) from HF tensors through the table;
    every shape is checked before any tensor is read."""
    source = HFParamSource(params, table, reader, layout, src)
    for name, param in _progress(list(params.items()), "import", dist.get_rank() == 0):
        with torch.no_grad():
            param.copy_(source(name).to(param.dtype))


def save_megatron(model, out: Path, meta: dict, hf_side_dir: str | Path, overwrite: bool,
                  source: HFParamSource) -> None:
    """Write ``model`` as a torch_dist checkpoint, atomically (rank 0 owns the rename).

    The model's parameters are never filled: each is converted by ``source`` when the writer
    reaches it and dropped after (``convert.streaming``), so memory holds about one parameter.
    """
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
        produce = ParameterProducer(source.params, source, source.rows, source.spans)
        dist_checkpointing.save(model.sharded_state_dict(), str(tmp / "weights"),
                                sharded_strategy=StreamingSaveStrategy(produce))
        dist.barrier()
        if ctx is not None:
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
            ctx.__exit__(None, None, None)
            ctx = None
    finally:
        if ctx is not None:
            import sys

            ctx.__exit__(*sys.exc_info())


# What every reader of a checkpoint's metadata relies on (the rest have defaults).
META_REQUIRED = ("dtype", "key_layout")


def read_meta(megatron_dir: str | Path) -> dict:
    path = Path(megatron_dir) / META_FILE
    if not path.is_file():
        raise CheckpointError(f"{megatron_dir}: no {META_FILE} (not a vlm-bridge Megatron checkpoint)")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not readable JSON ({exc}); import the model again") from None
    missing = [key for key in META_REQUIRED if not isinstance(meta, dict) or key not in meta]
    if missing:
        raise CheckpointError(f"{path}: no {', '.join(missing)} (an edited or truncated file); import the "
                              "model again")
    if meta["dtype"] not in DTYPES:
        raise CheckpointError(f"{path}: dtype {meta['dtype']!r} is not one of {', '.join(DTYPES)}")
    return meta


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
    with checkpoint_read_errors(weights_dir):
        dist_checkpointing.load(sd, weights_dir)


def open_hf_weights(hf_dir: str, hidden_size: int) -> tuple:
    """The folder's tensors, with fused MoE experts presented per expert; and their layout."""
    reader = SafetensorsReader(hf_dir)
    expert_layout = detect_expert_layout(reader, hidden_size)
    if expert_layout != PER_EXPERT:
        reader = ExpertSplitReader(reader, expert_layout)
    return reader, expert_layout


def _owners(params: dict, table: list[Entry]) -> dict[str, int]:
    """Global rank that sends each table entry to rank 0 (TP rank 0 of the stage that holds it)."""
    mine = [e.megatron for e in table if e.megatron in params]
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


@dataclass
class HFTarget:
    """Where and how an export writes: key layout, expert layout, side files, dtype."""

    folder: Path
    layout: KeyLayout
    dtype: torch.dtype
    side_dir: str | Path  # config, tokenizer and processor files copied next to the weights
    expert_layout: str = PER_EXPERT
    num_experts: int = 0
    max_shard_bytes: int = 2 * 1024**3
    copies: dict[str, str] = field(default_factory=dict)  # file key -> a second name it is written under


def write_hf(params: dict[str, torch.nn.Parameter], table: list[Entry], target: HFTarget,
             overwrite: bool, consume: bool = False, extra: dict[str, torch.Tensor] | None = None,
             stream: CheckpointParams | None = None) -> None:
    """Run on every rank: stream these parameters to an HF folder through the table; rank 0 writes.

    ``extra`` are non-weight tensors written as they are under their file names (floating ones in
    the output dtype), e.g. the passthrough constants of the source folder.

    ``consume`` frees each parameter once it is handed to the writer (the export command discards
    the model anyway), so peak memory falls as the export proceeds instead of adding the output
    buffer on top of a full model. With ``stream`` the parameters are not loaded yet: they are read
    from the checkpoint a batch of table entries at a time (about :data:`STREAM_BATCH_BYTES`), just
    before they are written.
    """
    owners = _owners(params, table)
    rank = dist.get_rank()
    ctx = atomic_output_dir(Path(target.folder), overwrite=overwrite) if rank == 0 else None
    tmp = ctx.__enter__() if ctx is not None else None
    try:
        writer = None
        if tmp is not None:
            gated = any(name.endswith(".gate_proj.weight") and ".experts." in name
                        for entry in table for name in entry.hf)
            writer = ExpertFusingWriter(
                ShardedSafetensorsWriter(tmp, target.max_shard_bytes), target.expert_layout,
                target.num_experts, gated,
            )
        loads = _stream_batches(params, table) if stream is not None else {}
        batches = [loads[start] for start in sorted(loads)]  # each read ahead PREFETCH_BATCHES early
        for names in batches[:PREFETCH_BATCHES]:
            stream.prefetch(names)
        loaded = 0
        for index, entry in enumerate(_progress(table, "export", rank == 0)):
            if index in loads:
                if loaded + PREFETCH_BATCHES < len(batches):
                    stream.prefetch(batches[loaded + PREFETCH_BATCHES])
                loaded += 1
                stream.load(loads[index])
            full, hf_tensors, owner = None, None, owners[entry.megatron]
            if entry.megatron in params:
                param = params[entry.megatron]
                rows = stream.rows(entry.megatron) if stream is not None else None
                if rows is not None and rank == owner == 0 and tp_world_size(param) == 1:
                    hf_tensors = _rows_as_hf(entry, rows)
                if hf_tensors is None:
                    local = param.data if rows is None else torch.cat(rows)
                    # only the owner (its TP group's first rank) writes or sends it
                    full = gather(local, param, entry.op.tp_chunks, first_only=True)
            if rank == owner and owner != 0:
                _send_tensor(full, 0)
            elif rank == 0:
                if hf_tensors is None:
                    hf_tensors = entry.op.to_hf(full if owner == 0 else _recv_tensor(owner))
                dtype = torch.float32 if entry.fp32 else target.dtype
                for name, t in zip(entry.hf, hf_tensors):
                    key, t = target.layout.to_file(name), t.to(device="cpu", dtype=dtype)
                    writer.add(key, t)
                    if key in target.copies:
                        writer.add(target.copies[key], t)
            del full, hf_tensors
            if consume and entry.megatron in params:
                params[entry.megatron].data = torch.empty(0)
                if stream is not None:
                    stream.release([entry.megatron])
        if rank == 0:
            for name, t in (extra or {}).items():
                writer.add(name, t.to(target.dtype) if t.is_floating_point() else t)
            writer.finalize()
            copy_hf_side_files(target.side_dir, tmp)
            _write_config_dtype(tmp, target.dtype)
            ctx.__exit__(None, None, None)
            ctx = None
    finally:
        if stream is not None:
            stream.close()
        if ctx is not None:
            import sys

            ctx.__exit__(*sys.exc_info())
    dist.barrier(group=cpu_group())


def _rows_as_hf(entry: Entry, rows: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """A stacked weight read as one slab per HF tensor is those tensors (no concatenation)."""
    # a stacked weight's HF tensors are equal parts (gate and up)
    if entry.op.stacks_rows and len(rows) == len(entry.hf) and len({r.shape for r in rows}) == 1:
        return rows
    return None


STREAM_BATCH_BYTES = 128 * 1024**2
# Batches whose reads are queued ahead of the one being written (see CheckpointParams.prefetch).
PREFETCH_BATCHES = 2


def _stream_batches(params: dict[str, torch.nn.Parameter], table: list[Entry]) -> dict[int, list[str]]:
    """``{table index: this rank's parameters to read there}``: consecutive entries of at most
    ``STREAM_BATCH_BYTES`` together (a bigger one alone). Each rank reads its own files, so ranks
    need not agree on the batches."""
    loads: dict[int, list[str]] = {}
    start, used = 0, None
    for index, entry in enumerate(table):
        param = params.get(entry.megatron)
        size = 0 if param is None else param.numel() * param.element_size()
        if used is None or used + size > STREAM_BATCH_BYTES:
            start, used = index, 0
        used += size
        if param is not None:
            loads.setdefault(start, []).append(entry.megatron)
    return loads


def _write_config_dtype(folder: Path, dtype: torch.dtype) -> None:
    """Record the exported dtype in config.json, as transformers does when it saves."""
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    name = str(dtype).removeprefix("torch.")
    for key in ("dtype", "torch_dtype"):
        if key in cfg:
            cfg[key] = name
    path.write_text(json.dumps(cfg, indent=2) + "\n")
