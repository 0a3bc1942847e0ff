"""Conversion that streams: a Megatron ``torch_dist`` checkpoint written and read a few tensors at
a time, so peak memory is a few tensors, not the model.

**Writing (import).** The model is built but its parameters are never filled: ``torch.empty``
memory that nothing writes is address space, not resident memory. Megatron's own ``torch_dist``
writer resolves every tensor of a rank up front; :class:`StreamingSaveStrategy` keeps Megatron's
format (its key translation, planner and metadata, so Megatron loads the result like any other
checkpoint) but writes through torch's synchronous ``FileSystemWriter``, which asks the planner for
one tensor's data at a time. The planner hands each write request's tensor (a parameter, or a view
of one for split fused weights) to a :class:`ParameterProducer` that returns the same region of
freshly converted data; it is written and dropped before the next one is made. A request for
rows that one HF tensor holds whole (half of a fused gate/up weight) is served from that tensor.

**Reading (export).** :class:`CheckpointParams` reads only the named parameters from a checkpoint,
in place; the exporter asks for a batch of table entries at a time and frees each parameter once
it is written. A parameter saved in files of its own (whole, or as row slabs) is memory-mapped
rather than read into memory: its pages are read once, as the writer copies them out.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from megatron.core.dist_checkpointing.core import CheckpointingException
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
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from vlm_bridge.convert.hf_io import CheckpointError
from vlm_bridge.convert.read_ahead import READ_AHEAD_BYTES, ReadAhead, Span

Producer = Callable[[torch.Tensor], torch.Tensor]


@contextlib.contextmanager
def checkpoint_read_errors(weights_dir: str | Path) -> Iterator[None]:
    """A checkpoint that cannot be read (truncated or corrupt files, another model's tensors) is a
    one-line CheckpointError naming it. torch's CheckpointException derives from BaseException
    and Megatron's from Exception, so neither would reach the usual error handling."""
    try:
        yield
    except CheckpointError:
        raise
    except (CheckpointException, CheckpointingException, RuntimeError, EOFError) as exc:
        while isinstance(exc, CheckpointException) and exc.failures:  # a rank's own error inside
            failure = next(iter(exc.failures.values()))
            exc = failure[0] if isinstance(failure, tuple) else failure
        text = " ".join(str(exc).split())
        raise CheckpointError(f"{weights_dir}: cannot read this checkpoint ({type(exc).__name__}: "
                              f"{text[:300]})") from None

def _names_by_storage(params: dict[str, torch.nn.Parameter]) -> dict[int, str]:
    """Which parameter a tensor (the parameter itself or a view into it) belongs to, by storage."""
    return {p.untyped_storage().data_ptr(): name for name, p in params.items() if p.numel()}


def _narrow(t: torch.Tensor, offsets, lengths) -> torch.Tensor:
    for dim, (start, length) in enumerate(zip(offsets, lengths)):
        t = t.narrow(dim, start, length)
    return t


class _ProducingPlanner(MCoreSavePlanner):
    """Megatron's save planner whose tensor data comes from a producer when it is written.

    With a :class:`ParameterProducer` that knows its sources' file spans, the planner also reads
    ahead: while one item is produced, the source bytes of the items that follow it in the plan
    (the order the writer takes them, one file each) are read into the page cache, up to
    ``READ_AHEAD_BYTES`` ahead (``convert.read_ahead``)."""

    def __init__(self, produce: Producer, **kwargs) -> None:
        super().__init__(**kwargs)
        self.produce = produce
        self.read_ahead = ReadAhead()
        self._order: list[WriteItem] = []
        self._position: dict = {}
        self._ends: list[int] = []  # bytes of the ordered items up to and including each
        self._next = 0  # the first ordered item whose sources are not queued yet

    def finish_plan(self, new_plan):
        plan = super().finish_plan(new_plan)
        if isinstance(self.produce, ParameterProducer) and self.produce.spans is not None \
                and ReadAhead.available():
            self._order = [item for item in plan.items if item.type != WriteItemType.BYTE_IO]
            self._position = {item.index: k for k, item in enumerate(self._order)}
            total = 0
            for item in self._order:
                data = item.tensor_data
                total += math.prod(data.chunk.sizes) * data.properties.dtype.itemsize
                self._ends.append(total)
        return plan

    def resolve_data(self, write_item: WriteItem):
        obj = super().resolve_data(write_item)
        if write_item.type == WriteItemType.BYTE_IO:
            return obj
        self._queue_after(write_item)
        return self.produce(obj)

    def _queue_after(self, write_item: WriteItem) -> None:
        k = self._position.get(write_item.index)
        if k is None:
            return
        self._next = max(self._next, k + 1)
        while self._next < len(self._order) and self._ends[self._next] - self._ends[k] <= READ_AHEAD_BYTES:
            upcoming = super().resolve_data(self._order[self._next])
            self.read_ahead.queue(self.produce.source_spans(upcoming))
            self._next += 1


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
        try:
            with without_record_crc():
                dcp_save(mcore_to_pyt_state_dict(state_dict, False), storage_writer=writer, planner=planner)
        finally:
            planner.read_ahead.close()


@contextlib.contextmanager
def without_record_crc() -> Iterator[None]:
    """torch.save without a CRC32 per record: computing it costs 0.6 s of a core per GB, more than
    writing the bytes to the page cache, and torch.load never checks it (a memory-mapped load
    cannot). The setting is process-wide (forked writers inherit it) and restored after."""
    crc = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(crc)


class ParameterProducer:
    """Maps a write request's tensor (a parameter or a view into one) to the same region of that
    parameter's fresh value, ``make(name)``; the last value is kept for the views that follow
    (a fused weight split into several checkpoint tensors). Tensors of no listed parameter
    (buffers, norms filled at construction) are written as they are.

    ``make_rows(name)``, where given, may instead return tensors whose concatenation along dim 0
    is the fresh value (a fused gate/up weight is its HF gate and up tensors): a request for whole
    rows of one of them is then served from it without building the concatenation.
    ``spans(name)``, where given, names the file bytes ``make(name)`` reads, for reading ahead."""

    def __init__(self, params: dict[str, torch.nn.Parameter], make: Callable[[str], torch.Tensor],
                 make_rows: Callable[[str], list[torch.Tensor] | None] | None = None,
                 spans: Callable[[str], list[Span]] | None = None) -> None:
        self.params, self.owner = params, _names_by_storage(params)
        self.make, self.make_rows, self.spans = make, make_rows, spans
        self._last: tuple[str, torch.Tensor] | None = None

    def _owner_of(self, view: torch.Tensor) -> str | None:
        return self.owner.get(view.untyped_storage().data_ptr()) if view.numel() else None

    def source_spans(self, view: torch.Tensor) -> list[Span]:
        """The file spans ``spans(name)`` that the value of a request's parameter is made from."""
        name = self._owner_of(view)
        return [] if name is None or self.spans is None else self.spans(name)

    def __call__(self, view: torch.Tensor) -> torch.Tensor:
        name = self._owner_of(view)
        if name is None:
            return view
        param = self.params[name]
        rows = self._from_rows(name, param, view)
        if rows is not None:
            return rows
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

    def _from_rows(self, name: str, param: torch.Tensor, request: torch.Tensor) -> torch.Tensor | None:
        # A layer's tensor in a stacked checkpoint tensor comes with leading axes of size 1.
        lead = request.dim() - param.dim()
        view = request.reshape(request.shape[lead:]) if lead > 0 and set(request.shape[:lead]) == {1} \
            else request
        if self.make_rows is None or param.dim() < 2 or not (view.is_contiguous() and param.is_contiguous()) \
                or view.shape[1:] != param.shape[1:]:
            return None
        start, misaligned = divmod(view.storage_offset() - param.storage_offset(), param.stride(0))
        pieces = None if misaligned else self.make_rows(name)
        if pieces is None:
            return None
        if sum(p.shape[0] for p in pieces) != param.shape[0] or \
                any(p.shape[1:] != param.shape[1:] for p in pieces):
            raise AssertionError(f"{name}: row pieces {[tuple(p.shape) for p in pieces]} do not make "
                                 f"{tuple(param.shape)}")
        first = 0
        for piece in pieces:
            if first <= start and start + view.shape[0] <= first + piece.shape[0]:
                rows = piece[start - first:start - first + view.shape[0]]
                return rows.to(param.dtype).contiguous().view(request.shape)
            first += piece.shape[0]
        return None


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
        self.params, owner = params, _names_by_storage(params)
        sd = model.sharded_state_dict()
        apply_factories(sd)
        self.items: dict[str, list[ShardedTensor]] = {}
        for item in nested_values(sd):
            if isinstance(item, ShardedTensor) and item.data is not None:
                name = owner.get(item.data.untyped_storage().data_ptr())
                if name is not None:
                    self.items.setdefault(name, []).append(item)
        self._rows: dict[str, list[torch.Tensor]] = {}
        self._maps: dict[str, torch.Tensor | None] = {}
        self.reader = FileSystemReader(weights_dir)
        self.metadata = self.reader.read_metadata()
        self.reader.set_up_storage_reader(self.metadata, True)
        self.weights_dir = weights_dir
        self.read_ahead = ReadAhead()

    def _reads(self, name: str) -> list[tuple[list, torch.Tensor]]:
        """Per checkpoint tensor of the parameter: its read items and the view they land in."""
        out = []
        for item in self.items.get(name, []):
            saved = self.metadata.state_dict_metadata.get(item.key)
            if saved is None or tuple(saved.size) != tuple(item.global_shape):
                found = "missing" if saved is None else f"of shape {tuple(saved.size)}"
                raise CheckpointError(f"{self.weights_dir}: tensor {item.key} is {found}; the model "
                                      f"expects {tuple(item.global_shape)}")
            view = item.data.view((1,) * item.prepend_axis_num + tuple(item.local_shape))
            chunk = ChunkStorageMetadata(offsets=torch.Size(item.global_offset), sizes=view.shape)
            out.append((create_read_items_for_chunk_list(item.key, saved, [chunk]), view))
        return out

    def prefetch(self, names: Iterable[str]) -> None:
        """Start reading these parameters' bytes into the page cache in the background (see
        ``convert.read_ahead``), so that a later :meth:`load` of them finds them there."""
        spans = []
        for name in names:
            for reads, _ in self._reads(name):
                for read in reads:
                    info = self.metadata.storage_data[read.storage_index]
                    spans.append((Path(self.weights_dir) / info.relative_path, info.offset, info.length))
        self.read_ahead.queue(spans)

    def close(self) -> None:
        """Stop reading ahead."""
        self.read_ahead.close()

    def load(self, names: Iterable[str]) -> None:
        with checkpoint_read_errors(self.weights_dir):
            self._load(names)

    def _load(self, names: Iterable[str]) -> None:
        views, reads = {}, []
        for name in names:
            mine = self._reads(name)  # per checkpoint tensor of the parameter, its reads
            for item_reads, view in mine:
                views.update((read.dest_index, view) for read in item_reads)
            mine = [item_reads for item_reads, _ in mine]
            if not self._map_rows(name, mine):
                reads += [read for item_reads in mine for read in item_reads]
        planner = _IntoViews(views)
        rest = [read for read in reads if not self._read_mapped(read, planner)]
        self._maps.clear()
        if rest:
            with torch.no_grad():  # the views are of parameters
                self.reader.read_data(LoadPlan(rest), planner).wait()

    def _mapped_chunk(self, read) -> torch.Tensor | None:
        """The saved chunk of ``read`` as a memory map, when its file holds just that chunk (as
        streaming imports write them); None otherwise."""
        info = self.metadata.storage_data[read.storage_index]
        if info.relative_path not in self._maps:  # within a load, each file is looked at once
            path = Path(self.weights_dir) / info.relative_path
            whole = info.offset == 0 and not getattr(info, "transform_descriptors", None) and \
                path.stat().st_size == info.length
            self._maps[info.relative_path] = \
                torch.load(path, mmap=True, weights_only=True, map_location="cpu") if whole else None
        return self._maps[info.relative_path]

    def _map_rows(self, name: str, reads: list[list]) -> bool:
        """A parameter saved whole, or as slabs of whole rows (a fused gate/up weight), each in a
        file of its own becomes those files' memory maps: its bytes are paged in once, by the
        export writer, instead of being copied into memory first. One slab replaces the
        parameter's data; several are kept for :meth:`rows`."""
        param, items = self.params[name], self.items.get(name, [])
        if not items or any(len(r) != 1 for r in reads) or not param.is_contiguous() or param.dim() == 0:
            return False
        slabs = []
        row_bytes = param.stride(0) * param.element_size()
        for item, (read,) in zip(items, reads):
            view = item.data
            start, misaligned = divmod(view.data_ptr() - param.data_ptr(), row_bytes)
            if misaligned or not view.is_contiguous() or view.shape[1:] != param.shape[1:]:
                return False
            chunk = self._mapped_chunk(read)
            if chunk is None or chunk.dtype != param.dtype or chunk.numel() != view.numel():
                return False
            slabs.append((start, chunk.view(view.shape)))
        slabs.sort(key=lambda slab: slab[0])
        if sum(chunk.shape[0] for _, chunk in slabs) != param.shape[0]:
            return False
        if len(slabs) == 1:
            param.data = slabs[0][1]
        else:
            self._rows[name] = [chunk for _, chunk in slabs]
        return True

    def rows(self, name: str) -> list[torch.Tensor] | None:
        """A loaded parameter that is held as row slabs (see :meth:`_map_rows`), in row order;
        their concatenation along dim 0 is its value. None when its data holds the value."""
        return self._rows.get(name)

    def _read_mapped(self, read, planner: _IntoViews) -> bool:
        """Serve a read from a file that holds just its chunk through a memory map, so the chunk is
        not first copied into memory of its own."""
        chunk = self._mapped_chunk(read)
        if chunk is None:
            return False
        chunk = _narrow(chunk, read.storage_offsets, read.lengths)
        with torch.no_grad():
            planner.resolve_tensor(read).copy_(chunk)
        return True

    def release(self, names: Iterable[str]) -> None:
        for name in names:
            self._rows.pop(name, None)
            for item in self.items.pop(name, []):
                item.data = None
