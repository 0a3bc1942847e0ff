"""Conversion that streams: a Megatron ``torch_dist`` checkpoint written and read a few tensors at
a time, so peak memory is a few tensors, not the model.

**Writing (import).** The model is built but its parameters are never filled: ``torch.empty``
memory that nothing writes is address space, not resident memory. Megatron's own ``torch_dist``
writer resolves every tensor of a rank up front; :class:`StreamingSaveStrategy` keeps Megatron's
format (its key translation, planner and metadata, so Megatron loads the result like any other
checkpoint) but writes through torch's synchronous ``FileSystemWriter``, which asks the planner for
one tensor's data at a time. The planner hands each write request's tensor (a parameter, or a view
of one for split fused weights) to a :class:`ParameterProducer` that returns the same region of
freshly converted data; it is written and dropped before the next one is made.

**Reading (export).** :class:`CheckpointParams` reads only the named parameters from a checkpoint,
in place; the exporter asks for a batch of table entries at a time and frees each parameter once
it is written.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from vlm_bridge.convert.hf_io import CheckpointError

Producer = Callable[[torch.Tensor], torch.Tensor]

_MMAP_THRESHOLD_BYTES = 128 * 1024
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def release_freed_memory_promptly() -> None:
    """Make glibc hand freed tensor memory back to the system at once, in this process and in the
    ranks it spawns (which read the environment variable at start).

    glibc raises its mmap threshold each time a large block is freed (up to 32 MB), after which
    tensors of a few MB come from the heap, whose freed pages it keeps: converting a 7B model one
    tensor at a time then grew to 8.4 GB instead of staying under 1 GB between batches. A fixed
    threshold keeps every block above 128 KB its own mapping. Conversion commands only: it costs
    page faults on workloads that allocate and free large tensors in a loop (training).
    """
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(_MMAP_THRESHOLD_BYTES))
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def _names_by_storage(params: dict[str, torch.nn.Parameter]) -> dict[int, str]:
    """Which parameter a tensor (the parameter itself or a view into it) belongs to, by storage."""
    return {p.untyped_storage().data_ptr(): name for name, p in params.items() if p.numel()}


def _narrow(t: torch.Tensor, offsets, lengths) -> torch.Tensor:
    for dim, (start, length) in enumerate(zip(offsets, lengths)):
        t = t.narrow(dim, start, length)
    return t


class _ProducingPlanner(MCoreSavePlanner):
    """Megatron's save planner whose tensor data comes from a producer when it is written."""

    def __init__(self, produce: Producer, **kwargs) -> None:
        super().__init__(**kwargs)
        self.produce = produce

    def resolve_data(self, write_item: WriteItem):
        obj = super().resolve_data(write_item)
        if write_item.type == WriteItemType.BYTE_IO:
            return obj
        return self.produce(obj)


class StreamingSaveStrategy(TorchDistSaveShardedStrategy):
    """Megatron's ``torch_dist`` format (version 1), written one tensor at a time (see the module)."""

    def __init__(self, produce: Producer) -> None:
        super().__init__("torch_dist", 1, thread_count=1)
        self.produce = produce

    def save(self, sharded_state_dict, checkpoint_dir: str | Path) -> None:
        state_dict, _, _ = _replace_state_dict_keys_with_sharded_keys(
            sharded_state_dict, self.keep_only_main_replica)
        planner = _ProducingPlanner(self.produce, dedup_replicated_tensors=not self.keep_only_main_replica,
                                    flatten_state_dict=False)
        # One file per tensor: torch's writer keeps every tensor of a file referenced until the
        # file is closed, so a file per rank would hold the whole rank in memory again.
        # No fsync per file: the checkpoint folder appears by an atomic rename, as every output here
        # does (atomic, not power-loss durable).
        writer = FileSystemWriter(checkpoint_dir, single_file_per_rank=False, thread_count=1,
                                  sync_files=False)
        dcp_save(mcore_to_pyt_state_dict(state_dict, False), storage_writer=writer, planner=planner)


class ParameterProducer:
    """Maps a write request's tensor (a parameter or a view into one) to the same region of that
    parameter's fresh value, ``make(name)``; the last value is kept for the views that follow
    (a fused weight split into several checkpoint tensors). Tensors of no listed parameter
    (buffers, norms filled at construction) are written as they are."""

    def __init__(self, params: dict[str, torch.nn.Parameter], make: Callable[[str], torch.Tensor]) -> None:
        self.params, self.owner = params, _names_by_storage(params)
        self.make = make
        self._last: tuple[str, torch.Tensor] | None = None

    def __call__(self, view: torch.Tensor) -> torch.Tensor:
        name = self.owner.get(view.untyped_storage().data_ptr()) if view.numel() else None
        if name is None:
            return view
        param = self.params[name]
        if self._last is None or self._last[0] != name:
            self._last = None  # drop the previous value before making the next
            fresh = self.make(name).to(param.dtype).contiguous()
            if fresh.shape != param.shape:
                raise AssertionError(f"{name}: produced {tuple(fresh.shape)}, expected {tuple(param.shape)}")
            self._last = (name, fresh)
        fresh = self._last[1]
        # as_strided counts from the start of the storage: a TP shard is often a view into the
        # whole converted tensor, starting past it.
        offset = fresh.storage_offset() + view.storage_offset() - param.storage_offset()
        return fresh.as_strided(view.shape, view.stride(), offset)


class _IntoViews:
    """The load planner side of a direct read: each read request lands in a slice of its view."""

    def __init__(self, views: dict) -> None:
        self.views = views

    def resolve_tensor(self, read_item) -> torch.Tensor:
        return _narrow(self.views[read_item.dest_index], read_item.dest_offsets, read_item.lengths)

    def commit_tensor(self, read_item, tensor: torch.Tensor) -> None:
        pass


class CheckpointParams:
    """Parameters read from a ``torch_dist`` checkpoint on demand, in place, and released again.

    The checkpoint's tensors for each parameter (a parameter or views of it, with their global
    offsets) are listed once, from the model as built. :meth:`load` reads exactly those regions
    with torch's checkpoint reader (chunks saved at another TP are cut to fit), one file at a
    time; Megatron's own loader cannot read part of a layer-stacked tensor. :meth:`release` drops
    the references, so that a parameter whose storage is replaced afterwards is freed."""

    def __init__(self, model: torch.nn.Module, params: dict[str, torch.nn.Parameter],
                 weights_dir: str) -> None:
        owner = _names_by_storage(params)
        sd = model.sharded_state_dict()
        apply_factories(sd)
        self.items: dict[str, list[ShardedTensor]] = {}
        for item in nested_values(sd):
            if isinstance(item, ShardedTensor) and item.data is not None:
                name = owner.get(item.data.untyped_storage().data_ptr())
                if name is not None:
                    self.items.setdefault(name, []).append(item)
        self.reader = FileSystemReader(weights_dir)
        self.metadata = self.reader.read_metadata()
        self.reader.set_up_storage_reader(self.metadata, True)
        self.weights_dir = weights_dir

    def load(self, names: Iterable[str]) -> None:
        views, reads = {}, []
        for name in names:
            for item in self.items.get(name, []):
                saved = self.metadata.state_dict_metadata.get(item.key)
                if saved is None or tuple(saved.size) != tuple(item.global_shape):
                    found = "missing" if saved is None else f"of shape {tuple(saved.size)}"
                    raise CheckpointError(f"{self.weights_dir}: tensor {item.key} is {found}; the model "
                                          f"expects {tuple(item.global_shape)}")
                view = item.data.view((1,) * item.prepend_axis_num + tuple(item.local_shape))
                chunk = ChunkStorageMetadata(offsets=torch.Size(item.global_offset), sizes=view.shape)
                for read in create_read_items_for_chunk_list(item.key, saved, [chunk]):
                    views[read.dest_index] = view
                    reads.append(read)
        planner = _IntoViews(views)
        rest = [read for read in reads if not self._read_mapped(read, planner)]
        if rest:
            with torch.no_grad():  # the views are of parameters
                self.reader.read_data(LoadPlan(rest), planner).wait()

    def _read_mapped(self, read, planner: _IntoViews) -> bool:
        """Serve a read from a file that holds just its chunk (as streaming imports write them)
        through a memory map, so the chunk is not first copied into memory of its own."""
        info = self.metadata.storage_data[read.storage_index]
        path = Path(self.weights_dir) / info.relative_path
        if info.offset != 0 or getattr(info, "transform_descriptors", None) or \
                path.stat().st_size != info.length:
            return False
        chunk = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
        chunk = _narrow(chunk, read.storage_offsets, read.lengths)
        with torch.no_grad():
            planner.resolve_tensor(read).copy_(chunk)
        return True

    def release(self, names: Iterable[str]) -> None:
        for name in names:
            for item in self.items.pop(name, []):
                item.data = None
