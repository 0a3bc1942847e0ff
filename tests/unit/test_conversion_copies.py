"""Conversion moves each byte as few times as it can: the importer reads HF tensors as file views,
serves a fused gate/up weight's checkpoint halves straight from the HF gate and up tensors, and
the exporter maps a checkpoint tensor saved in a file of its own instead of copying it. Each path
is checked to be taken (not silently replaced by the copying one) and to give the same bytes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vlm_bridge.convert.hf_io import SafetensorsReader
from vlm_bridge.convert.streaming import ParameterProducer


def _refuse(name: str) -> torch.Tensor:
    raise AssertionError(f"{name} was built whole")


def test_reader_hands_out_file_views_only_when_asked(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.arange(12.0).reshape(3, 4)}, str(tmp_path / "model.safetensors"))
    with SafetensorsReader(tmp_path) as reader:
        view, again = reader.get("w", copy=False), reader.get("w", copy=False)
        owned = reader.get("w")
        assert view.data_ptr() == again.data_ptr() != owned.data_ptr()
        assert view.untyped_storage().nbytes() == view.nbytes  # exactly the tensor, not the file
        assert torch.equal(view, owned)


def test_producer_serves_whole_rows_from_their_piece_without_building_the_param():
    gate, up = torch.randn(4, 3), torch.randn(6, 3)
    param = torch.nn.Parameter(torch.empty(10, 3))
    produce = ParameterProducer({"fc1": param}, _refuse, lambda name: [gate, up])
    assert torch.equal(produce(param.data[:4]), gate)
    assert torch.equal(produce(param.data[4:]), up)
    # a layer of a stacked checkpoint tensor: leading axes of size 1 are kept in the answer
    stacked = produce(param.data[5:9].view(1, 4, 3))
    assert stacked.shape == (1, 4, 3) and torch.equal(stacked[0], up[1:5])


def test_producer_builds_the_param_for_a_request_across_pieces():
    gate, up = torch.randn(4, 3), torch.randn(6, 3)
    param = torch.nn.Parameter(torch.empty(10, 3))
    produce = ParameterProducer({"fc1": param}, lambda name: torch.cat([gate, up]), lambda name: [gate, up])
    assert torch.equal(produce(param.data[2:7]), torch.cat([gate, up])[2:7])
    bad = ParameterProducer({"fc1": param}, _refuse, lambda name: [gate, up[:5]])
    with pytest.raises(AssertionError, match="do not make"):
        bad(param.data[:4])


def _mapped_files(address: int) -> list[str]:
    """Paths of the file mappings of this process that contain ``address`` (Linux)."""
    found = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, *rest = line.split(maxsplit=5)
        low, high = (int(x, 16) for x in span.split("-"))
        if low <= address < high and len(rest) == 5:
            found.append(rest[4])
    return found


def _export_reads(megatron_dir: str) -> dict:
    from vlm_bridge.convert.streaming import CheckpointParams
    from vlm_bridge.loading import _build_for_checkpoint
    from vlm_bridge.parallel import ParallelConfig, init_distributed

    init_distributed(ParallelConfig())
    built, _ = _build_for_checkpoint(megatron_dir, ParallelConfig(), None)
    from vlm_bridge.convert.read_ahead import read_into_page_cache

    stream = CheckpointParams(built.model, built.params, f"{megatron_dir}/weights")
    fc1 = "language_model.decoder.layers.0.mlp.linear_fc1.weight"
    fc2 = "language_model.decoder.layers.0.mlp.linear_fc2.weight"
    queued: list = []
    read_ahead, stream.read_ahead = stream.read_ahead, SimpleNamespace(queue=queued.extend)
    stream.prefetch([fc1, fc2])
    stream.read_ahead = read_ahead
    read_into_page_cache([*queued, (Path(megatron_dir) / "missing.distcp", 0, 8)])  # a hint: never raises
    stream.load([fc1, fc2])
    return {
        "prefetched": sorted(str(path) for path, offset, length in queued
                             if 0 <= offset and offset + length <= path.stat().st_size),
        "rows": [(t.clone(), _mapped_files(t.data_ptr())) for t in stream.rows(fc1) or []],
        "fc2": (built.params[fc2].data.clone(), _mapped_files(built.params[fc2].data_ptr())),
    }


@pytest.mark.slow
def test_export_maps_saved_tensors_instead_of_copying_them(tmp_path):
    from vlm_bridge.loading import import_hf
    from vlm_bridge.parallel import ParallelConfig, run_parallel
    from vlm_bridge.testing.tiny_qwen2_5_vl import build_tiny_qwen2_5_vl

    hf = build_tiny_qwen2_5_vl(tmp_path / "hf", dtype=torch.bfloat16)
    run_parallel(import_hf, 1, str(hf), str(tmp_path / "meg"), ParallelConfig(), None, False)
    got = run_parallel(_export_reads, 1, str(tmp_path / "meg"))
    assert len(got["rows"]) == 2
    for _, files in [*got["rows"], got["fc2"]]:
        assert files and files[0].endswith(".distcp"), files
    # the background read-ahead covers exactly the files the load then maps
    assert got["prefetched"] == sorted(files[0] for _, files in [*got["rows"], got["fc2"]])
    with SafetensorsReader(hf) as reader:
        gate = next(k for k in reader.keys() if k.endswith("layers.0.mlp.gate_proj.weight"))
        mlp = gate.removesuffix("gate_proj.weight")
        assert torch.equal(got["rows"][0][0], reader.get(mlp + "gate_proj.weight"))
        assert torch.equal(got["rows"][1][0], reader.get(mlp + "up_proj.weight"))
        assert torch.equal(got["fc2"][0], reader.get(mlp + "down_proj.weight"))


def test_allocator_settings_need_no_torch():
    code = ("import os, sys; from vlm_bridge.convert.allocator import tune_allocator_for_conversion; "
            "tune_allocator_for_conversion(); assert 'torch' not in sys.modules; "
            "print(os.environ['THP_MEM_ALLOC_ENABLE'], os.environ['MALLOC_MMAP_THRESHOLD_'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "131072"]


def _import_with_read_ahead_log(hf: str, out: str, budget: int) -> list:
    from vlm_bridge.convert import streaming
    from vlm_bridge.convert.read_ahead import ReadAhead
    from vlm_bridge.loading import import_hf
    from vlm_bridge.parallel import ParallelConfig

    events: list = []
    produce, queue, limit = streaming.ParameterProducer.__call__, ReadAhead.queue, streaming.READ_AHEAD_BYTES

    def logged_produce(self, view):
        events.append(("made", view.nbytes, None))
        return produce(self, view)

    streaming.ParameterProducer.__call__ = logged_produce
    ReadAhead.queue = lambda self, spans: events.extend(("queued", length, (str(path), offset))
                                                        for path, offset, length in spans)
    streaming.READ_AHEAD_BYTES = budget
    try:
        import_hf(hf, out, ParallelConfig(), None, False)
    finally:
        streaming.ParameterProducer.__call__, ReadAhead.queue = produce, queue
        streaming.READ_AHEAD_BYTES = limit
    return events


@pytest.mark.slow
def test_import_reads_the_next_tensors_ahead_within_its_budget(tmp_path):
    from vlm_bridge.parallel import run_parallel
    from vlm_bridge.testing.checks import checkpoint_mismatches
    from vlm_bridge.testing.tiny_qwen2_5_vl import build_tiny_qwen2_5_vl

    hf = build_tiny_qwen2_5_vl(tmp_path / "hf", dtype=torch.bfloat16)
    with SafetensorsReader(hf) as reader:
        spans = {(str(path), offset): length for path, offset, length in map(reader.span, reader.keys())}
        largest = max(spans.values())
    budget = 4 * largest
    events = run_parallel(_import_with_read_ahead_log, 1, str(hf), str(tmp_path / "meg"), budget)
    seen: set = set()  # a span asked for again (several items of one parameter) is read once
    events = [event for event in events if event[2] is None or not (event[2] in seen or seen.add(event[2]))]
    queued = {where: length for kind, length, where in events if kind == "queued"}
    assert all(spans.get(where) == length for where, length in queued.items())  # real tensors' bytes
    assert len(queued) > 0.9 * len(spans)
    ahead = made = 0
    for kind, nbytes, _ in events:  # queued bytes never run far past what has been made
        ahead, made = ahead + nbytes * (kind == "queued"), made + nbytes * (kind == "made")
        assert ahead - made <= budget + 2 * largest, (ahead, made)
    # the read spans are the tensors' own bytes: the folder converted through them is unchanged
    export = tmp_path / "out"
    from vlm_bridge.loading import export_hf
    from vlm_bridge.parallel import ParallelConfig

    run_parallel(export_hf, 1, str(tmp_path / "meg"), str(export), ParallelConfig(), None, False)
    assert checkpoint_mismatches(hf, export) == []


def test_read_ahead_reads_each_span_once_and_skips_what_it_cannot_read(tmp_path):
    from vlm_bridge.convert import read_ahead

    data = tmp_path / "data.bin"
    data.write_bytes(bytes(range(256)) * 64)
    spans = [(data, 0, 4096), (data, 4096, 12288), (tmp_path / "missing.bin", 0, 8), (data, 16000, 999)]
    read_ahead.read_into_page_cache(spans)  # past the end and a missing file: a hint never raises
    done: list = []
    reader = read_ahead.ReadAhead()
    real, read_ahead.read_into_page_cache = read_ahead.read_into_page_cache, done.extend
    try:
        reader.queue(spans[:2])
        reader.queue(spans[1:])
        reader.close(finish=True)
    finally:
        read_ahead.read_into_page_cache = real
    assert done == spans if read_ahead.ReadAhead.available() else done == []
