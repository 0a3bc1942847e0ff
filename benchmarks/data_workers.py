"""Host time a training step spends encoding its samples, with and without encoding workers, and
with the next step built ahead in a thread.

    python benchmarks/data_workers.py [--hf DIR] [--samples 24] [--steps 6] [--step-seconds 1.6]
                                      [--workers 0,1,2] [--ahead 1,2] [--launch-seconds 0.4]

The trainer's own stream (``MicroBatchStream``: best-fit packing, the model's HF processor)
builds ``--steps`` steps of ``--samples`` samples each (the step benchmark's mixed-image samples,
new ones every step, Qwen2.5-VL's processor at up to ``--max-pixels`` per image, as
``sft_step.py`` sets it). The GPU's share of a step is stood in for by ``--step-seconds`` of
waiting: the host is free then, as it is while a GPU computes (1.6 s: 19,731 tokens at the
12,497 tokens/s one H200 trained the 14-layer 7B model at). Reported per worker count: the host
time of each step's ``next_step`` (encoding what the workers have not, packing, collating: the
time a GPU would wait between steps), and its median from the third step on (the first two fill
the look-ahead); the baseline is ``--workers 0``, encoding in the trainer's process as before
``data.workers``.

``--ahead`` runs those worker counts again with the next step built in a thread while the step
"trains" (``MicroBatchStream.prepare_next``, as the trainer does). A real rank is not idle then:
it launches the step's kernels, Python work under the GIL that a building thread competes with.
``--launch-seconds`` of pure-Python work stands in for that at the start of each step's GPU share,
and the time it took is reported too (``launch_s``): what the thread costs the launching.
Prints one JSON line, then a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _processor_dir(args) -> Path:
    if args.hf:
        return Path(args.hf)
    from vlm_bridge.testing.tiny_qwen2_5_vl import build_tiny_qwen2_5_vl

    return build_tiny_qwen2_5_vl(Path(tempfile.mkdtemp(prefix="data_workers_")) / "hf", seed=0)


def _python_work(seconds: float) -> float:
    """Busy pure-Python work calibrated to ``seconds`` on an idle core; returns the time it took."""
    start = time.perf_counter()
    n = 0
    for _ in range(int(seconds * _LOOPS_PER_SECOND)):
        n += 1
    return time.perf_counter() - start


_LOOPS_PER_SECOND = 0.0


def _calibrate() -> None:
    global _LOOPS_PER_SECOND
    _LOOPS_PER_SECOND = 1e6
    took = _python_work(0.2)  # 200,000 loops at the provisional rate
    _LOOPS_PER_SECOND = 1e6 * 0.2 / took


def _time_steps(hf_dir: Path, workers: int, ahead: bool, args) -> dict:
    import torch
    from sft_step import make_samples

    from vlm_bridge.data.encode import SampleEncoder
    from vlm_bridge.loading import load_hf_config, load_processor
    from vlm_bridge.registry import family_for_config
    from vlm_bridge.train.data_stream import MicroBatchStream

    hf_config = load_hf_config(hf_dir)
    family = family_for_config(hf_config)
    _, _, settings = family.build_configs(hf_config, torch.float32, 1, 1, 1)
    processor = load_processor(hf_dir)
    processor.image_processor.size = {"shortest_edge": 56 * 56, "longest_edge": args.max_pixels}
    tok = processor.tokenizer
    samples = make_samples(args.samples * (args.steps + 2), args.seed, tok)
    stream = MicroBatchStream(samples, SampleEncoder(processor, args.seq_len), family, settings,
                              seq_len=args.seq_len, pack=True, micro_batch_size=1, pad_id=tok.pad_token_id,
                              seed=args.seed, shuffle=False, pad_to_seq_len=False)
    stream.encode_ahead(workers)
    rows = -(-sum(len(stream.encoder.encode(s)) for s in samples[: args.samples]) // args.seq_len) + 1
    host, launch = [], []
    try:
        for step in range(args.steps):
            start = time.perf_counter()
            stream.next_step(rows)
            host.append(time.perf_counter() - start)
            if ahead and step + 1 < args.steps:
                stream.prepare_next(rows)
            gpu_start = time.perf_counter()
            launch.append(_python_work(args.launch_seconds))  # the rank launches the step's kernels
            # the GPU computes; the host waits for it
            time.sleep(max(0.0, args.step_seconds - (time.perf_counter() - gpu_start)))
    finally:
        stream.close()
    steady = sorted(host[2:])  # the first two steps fill the look-ahead
    return {"workers": workers, "ahead": ahead, "host_s": host, "median_host_s": steady[len(steady) // 2],
            "launch_s": launch, "median_launch_s": sorted(launch[2:])[len(launch[2:]) // 2],
            "samples_taken": stream.resume_position.index}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hf", default=None, help="a Qwen2.5-VL folder (default: the tiny builder's)")
    p.add_argument("--samples", type=int, default=24)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--step-seconds", type=float, default=1.6)
    p.add_argument("--workers", default="0,1,2")
    p.add_argument("--ahead", default="1,2", help="these worker counts again, the next step built ahead")
    p.add_argument("--launch-seconds", type=float, default=0.4,
                   help="pure-Python work at each step's start: the rank launching kernels")
    p.add_argument("--max-pixels", type=int, default=896 * 896)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the JSON result here")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    hf_dir = _processor_dir(args)
    _calibrate()
    runs = [(int(w), False) for w in args.workers.split(",")]
    runs += [(int(w), True) for w in args.ahead.split(",") if w]
    results = [_time_steps(hf_dir, w, ahead, args) for w, ahead in runs]
    base = results[0]["median_host_s"]
    report = {"samples_per_step": args.samples, "step_seconds": args.step_seconds,
              "launch_seconds": args.launch_seconds, "cpus": os.cpu_count(),
              "results": results, "host_time_vs_first": [r["median_host_s"] / base for r in results]}
    print(json.dumps(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{args.samples} samples a step, {args.step_seconds:.2f} s of GPU time stood in by waiting, "
          f"{os.cpu_count()} CPUs")
    print(f"{'workers':<9}{'ahead':<7}{'host s a step (median from step 3)':>36}{'vs first':>10}"
          f"{'launch s':>10}   every step")
    for r, ratio in zip(results, report["host_time_vs_first"]):
        every = ", ".join(f"{t:.2f}" for t in r["host_s"])
        print(f"{r['workers']:<9}{'yes' if r['ahead'] else 'no':<7}{r['median_host_s']:>36.3f}{ratio:>9.2f}x"
              f"{r['median_launch_s']:>10.3f}   {every}")


if __name__ == "__main__":
    main()
