"""Time HF -> Megatron import and Megatron -> HF export against a raw safetensors read and copy.

    python benchmarks/convert_throughput.py HF_DIR [--tp 2] [--workdir DIR] [--dtype bf16] [--keep] [--cold]

Phases, in this order (each with wall time, MB/s over the HF tensor bytes, and peak memory):
raw copy (after an untimed read that warms the page cache, every tensor's bytes read as the
importer reads them and written once into one file on the work folder's filesystem: the I/O floor
of any conversion, which reads and writes every byte), kernel copy (the same bytes copied by
``copy_file_range``, never through user memory: the most a conversion could write), raw read
(every tensor once, copied into memory: the baseline of the goal, and the page-cache warm-up, so
import and export are not charged for cold disk), import (``import_hf`` under ``run_parallel``),
export (``export_hf``), and a bit-exact round-trip check of the exported folder, one tensor at a
time. Dirty pages are flushed between phases, untimed. MB and GB are 10^6 and 10^9 bytes. Prints
one JSON line, then a table.

``--cold`` reads every phase's input from disk instead: each input is dropped from the page cache
first, and the raw read and copy read the shards by large sequential reads (the best a plain copy
does from disk), so the baselines are the disk's floor, not the page cache's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

# torch and vlm_bridge are imported inside the functions: Megatron's torch_dist save starts a
# spawn-context multiprocessing Manager, which re-imports this file as __mp_main__ (as it would
# re-import the light cli.py), and heavy imports here would bill seconds and ~0.5 GB to import.


def _memory(proc: psutil.Process) -> tuple[int, int, int]:
    """(RSS, PSS, anonymous PSS) in bytes; PSS splits shared pages among the processes sharing them.

    Summed RSS over-counts twice here: the reader mmaps whole shards (file pages in RSS), and
    Megatron's torch_dist save forks writer processes whose copy-on-write pages are counted again.
    The PSS sum is the tree's real footprint; anonymous PSS leaves out the page-cache-backed mmaps.
    """
    try:
        with open(f"/proc/{proc.pid}/smaps_rollup") as fh:
            kb = {k: int(v.split()[0]) for k, v in (ln.split(":", 1) for ln in fh if ":" in ln[:20])}
        return kb["Rss"] * 1024, kb["Pss"] * 1024, kb.get("Pss_Anon", kb["Pss"]) * 1024
    except (OSError, KeyError, ValueError):  # not Linux, or the process is gone
        rss = proc.memory_info().rss
        return rss, rss, rss


class PeakMemory:
    """Peaks of summed RSS / PSS / anonymous PSS over this process and its descendants (0.2 s poll)."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval, self.peak = interval, [0, 0, 0]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _sample(self) -> None:
        me = psutil.Process()
        total = [0, 0, 0]
        for proc in [me, *me.children(recursive=True)]:
            try:
                total = [a + b for a, b in zip(total, _memory(proc))]
            except psutil.Error:  # a rank or writer exited between listing and reading
                continue
        self.peak = [max(a, b) for a, b in zip(self.peak, total)]

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> PeakMemory:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def timed(fn: Callable[[], Any]) -> tuple[Any, dict]:
    """Run ``fn``; wall seconds and peak summed RSS / PSS / anonymous PSS in GB."""
    start = time.perf_counter()
    with PeakMemory() as mem:
        result = fn()
    stats = {"seconds": time.perf_counter() - start, "peak_rss_gb": mem.peak[0] / 1e9,
             "peak_pss_gb": mem.peak[1] / 1e9, "peak_anon_gb": mem.peak[2] / 1e9}
    return result, stats


def raw_read(hf_dir: str | Path) -> int:
    """Read every tensor once through the same reader (mmap + copy) the importer uses."""
    from vlm_bridge.convert.hf_io import SafetensorsReader

    total = 0
    with SafetensorsReader(hf_dir) as reader:
        for name in reader.keys():
            total += reader.get(name).nbytes
    return total


def raw_copy(hf_dir: str | Path, out_file: str | Path) -> int:
    """Write every tensor's bytes once into one file, read as the importer reads them (file views):
    the I/O floor of any conversion, which reads and writes every byte."""
    import torch

    from vlm_bridge.convert.hf_io import SafetensorsReader

    total = 0
    with SafetensorsReader(hf_dir) as reader, open(out_file, "wb") as fh:
        for name in reader.keys():
            t = reader.get(name, copy=False)
            fh.write(t.reshape(-1).view(torch.uint8).numpy().data)
            total += t.nbytes
    return total


def raw_copy_sequential(hf_dir: str | Path, out_file: str | Path | None, chunk: int = 64 * 1024**2) -> int:
    """The cold-disk floor: every tensor's bytes read by large sequential reads of the shards (the
    kernel reads ahead of them asynchronously) and written into one file (None: only read)."""
    from vlm_bridge.convert.hf_io import SafetensorsReader

    with SafetensorsReader(hf_dir) as reader:
        spans = sorted(reader.span(name) for name in reader.keys())
    buffer = memoryview(bytearray(chunk))
    total = 0
    with open(out_file or os.devnull, "wb") as out:
        for path, offset, length in spans:
            with open(path, "rb", buffering=0) as src:
                src.seek(offset)
                while length > 0:
                    got = src.readinto(buffer[:min(chunk, length)])
                    if out_file is not None:
                        out.write(buffer[:got])
                    length, total = length - got, total + got
    return total


def kernel_copy(hf_dir: str | Path, out_file: str | Path) -> int:
    """Every tensor's bytes copied into one file by ``copy_file_range``: the kernel moves them
    from page cache to page cache without a pass through user memory, the fastest any program
    can write what it reads on this machine (the ceiling of a conversion, which must write every
    byte it reads)."""
    from vlm_bridge.convert.hf_io import SafetensorsReader

    with SafetensorsReader(hf_dir) as reader:
        spans = sorted(reader.span(name) for name in reader.keys())
    total = 0
    with open(out_file, "wb") as out:
        for path, offset, length in spans:
            with open(path, "rb", buffering=0) as src:
                while length > 0:
                    got = os.copy_file_range(src.fileno(), out.fileno(), length, offset)
                    if got == 0:
                        raise OSError(f"{path}: ends before byte {offset + length}")
                    offset, length, total = offset + got, length - got, total + got
    return total


def round_trip_equal(src: str | Path, dst: str | Path) -> dict:
    """Bit-exact comparison, streamed: same keys, dtypes, shapes and values."""
    import torch

    from vlm_bridge.convert.hf_io import SafetensorsReader

    with SafetensorsReader(src) as a, SafetensorsReader(dst) as b:
        if a.keys() != b.keys():
            diff = sorted(set(a.keys()) ^ set(b.keys()))
            return {"equal": False, "reason": f"key sets differ: {diff[:5]}"}
        for name in a.keys():
            x, y = a.get(name), b.get(name)
            if x.dtype != y.dtype or not torch.equal(x, y):
                return {"equal": False, "reason": f"{name}: {x.dtype}/{y.dtype} or values differ"}
    return {"equal": True, "tensors": len(a.keys())}


def dir_bytes(path: str | Path, suffix: str = "") -> int:
    return sum(f.stat().st_size for f in Path(path).rglob(f"*{suffix}") if f.is_file())


def drop_from_page_cache(*folders: str | Path) -> None:
    """Flush dirty pages, then ask the kernel to drop these folders' files from the page cache
    (``POSIX_FADV_DONTNEED``; no privileges needed), so the next phase reads them from disk."""
    os.sync()
    for folder in folders:
        for f in Path(folder).rglob("*"):
            if f.is_file():
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


def benchmark(hf_dir: str, workdir: str, tp: int = 1, dtype: str | None = None, cold: bool = False) -> dict:
    """All phases; ``workdir`` receives ``megatron/`` and ``export/``. ``cold``: every phase reads
    its input from disk (dropped from the page cache first), the baselines included."""
    from vlm_bridge.convert.allocator import tune_allocator_for_conversion

    tune_allocator_for_conversion()  # as the import / export commands do, before torch is imported
    import torch

    from vlm_bridge.convert.hf_io import SafetensorsReader
    from vlm_bridge.loading import export_hf, import_hf
    from vlm_bridge.parallel import ParallelConfig, run_parallel

    parallel = ParallelConfig(tp=tp)
    mg_dir, out_dir = Path(workdir) / "megatron", Path(workdir) / "export"
    size = SafetensorsReader(hf_dir).total_bytes()
    Path(workdir).mkdir(parents=True, exist_ok=True)
    copy_file = Path(workdir) / "raw_copy.bin"
    # Each phase starts with no dirty pages of the one before (flushing them is not timed), and
    # the copy reads warm pages as the import does.
    settle = (lambda *inputs: drop_from_page_cache(*inputs)) if cold else (lambda *inputs: os.sync())
    if cold:
        drop_from_page_cache(hf_dir)
    else:
        raw_read(hf_dir)
    _, copy = timed(lambda: (raw_copy_sequential if cold else raw_copy)(hf_dir, copy_file))
    copy_file.unlink()
    settle(hf_dir)
    _, kernel = timed(lambda: kernel_copy(hf_dir, copy_file))
    copy_file.unlink()
    settle(hf_dir)
    _, raw = timed(lambda: raw_copy_sequential(hf_dir, None) if cold else raw_read(hf_dir))
    settle(hf_dir)
    _, imp = timed(lambda: run_parallel(import_hf, tp, hf_dir, str(mg_dir), parallel, dtype, True))
    settle(mg_dir, hf_dir)
    _, exp = timed(lambda: run_parallel(export_hf, tp, str(mg_dir), str(out_dir), parallel, dtype,
                                        True, 5 * 1024**3))
    os.sync()
    check, chk = timed(lambda: round_trip_equal(hf_dir, out_dir))
    phases = {"raw_copy": copy, "kernel_copy": kernel, "raw_read": raw, "import": imp, "export": exp,
              "check": chk}
    for stats in phases.values():
        stats["mb_per_s"] = size / 1e6 / stats["seconds"]
    return {
        "hf_dir": str(hf_dir), "tp": tp, "cpu": not torch.cuda.is_available(), "cold": cold,
        "checkpoint_gb": size / 1e9, "files_gb": dir_bytes(hf_dir, ".safetensors") / 1e9,
        "megatron_gb": dir_bytes(mg_dir / "weights") / 1e9,
        "import_vs_raw": imp["mb_per_s"] / raw["mb_per_s"],
        "export_vs_raw": exp["mb_per_s"] / raw["mb_per_s"],
        "import_vs_copy": imp["mb_per_s"] / copy["mb_per_s"],
        "export_vs_copy": exp["mb_per_s"] / copy["mb_per_s"],
        "kernel_copy_vs_raw": kernel["mb_per_s"] / raw["mb_per_s"],
        # Lifetime max of one process each (not a sum): a cross-check of the polled numbers.
        "ru_maxrss_self_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
        "ru_maxrss_children_gb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e9,
        "round_trip": check, "phases": phases,
    }


def table(r: dict) -> str:
    lines = [f"{r['hf_dir']}: {r['checkpoint_gb']:.3f} GB tensors, tp={r['tp']}, "
             f"megatron ckpt {r['megatron_gb']:.3f} GB",
             f"{'phase':<12}{'seconds':>9}{'MB/s':>10}{'x raw':>8}{'RSS GB':>9}{'PSS GB':>9}"
             f"{'anon GB':>9}"]
    raw = r["phases"]["raw_read"]["mb_per_s"]
    for name, s in r["phases"].items():
        lines.append(f"{name:<12}{s['seconds']:>9.2f}{s['mb_per_s']:>10.1f}{s['mb_per_s'] / raw:>8.3f}"
                     f"{s['peak_rss_gb']:>9.2f}{s['peak_pss_gb']:>9.2f}{s['peak_anon_gb']:>9.2f}")
    lines.append("round trip: " + ("bit-exact" if r["round_trip"]["equal"] else r["round_trip"]["reason"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("hf_dir")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                   help="import/export dtype (default: the checkpoint's; round trip needs that)")
    p.add_argument("--workdir", default=None, help="default: a temporary folder next to hf_dir")
    p.add_argument("--keep", action="store_true", help="keep the Megatron and exported folders")
    p.add_argument("--cold", action="store_true",
                   help="every phase reads from disk: inputs are dropped from the page cache first")
    args = p.parse_args(argv)
    os.environ.setdefault("CI", "1")  # no tqdm bars interleaved with the timings
    # Same filesystem as the input by default, so /tmp (often RAM-backed) does not flatter export.
    workdir = args.workdir or tempfile.mkdtemp(prefix=".bench-", dir=Path(args.hf_dir).resolve().parent)
    try:
        result = benchmark(args.hf_dir, workdir, args.tp, args.dtype, args.cold)
    finally:
        if not args.keep:  # only what this script wrote, never a user-given folder itself
            for sub in ("megatron", "export"):
                shutil.rmtree(Path(workdir) / sub, ignore_errors=True)
            if args.workdir is None:
                shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(result))
    print(table(result))
    return 0 if result["round_trip"]["equal"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
