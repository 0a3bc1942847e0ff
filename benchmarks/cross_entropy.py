"""The whole-logits loss of one micro-batch: Megatron's vocabulary-parallel cross-entropy on the
fp32 copy of the logits (the baseline) against the fused Triton loss that reads the bf16 logits
where they lie (``families/_common/fused_cross_entropy.py``), forward + backward.

    python3 benchmarks/cross_entropy.py --tokens 4096 --vocab 152064 --out $OUT/ce.json
"""

from __future__ import annotations

import argparse
import json
import os

import torch


def _time_ms(fn, repeats: int) -> tuple[float, float]:
    """Median milliseconds of ``fn`` and the peak memory it added above what was allocated, GB."""
    fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2], (torch.cuda.max_memory_allocated() - base) / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=152064)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("cross_entropy.py times CUDA kernels: it needs a GPU")

    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from vlm_bridge.families._common.fused_cross_entropy import fused_vocab_parallel_cross_entropy
    from vlm_bridge.parallel import ParallelConfig, init_distributed

    # One process, no launcher: the rendezvous variables torch.distributed reads from the environment.
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29517"}.items():
        os.environ.setdefault(key, value)
    init_distributed(ParallelConfig())
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(args.tokens, 1, args.vocab, device="cuda", generator=gen) * 3).bfloat16()
    labels = torch.randint(0, args.vocab, (args.tokens, 1), device="cuda", generator=gen)
    upstream = torch.rand(args.tokens, 1, device="cuda", generator=gen)

    # The model's logits are a non-leaf made for the loss alone; a copy stands in for the output
    # layer on both sides.
    def megatron() -> None:
        made = logits.detach().requires_grad_() * 1
        vocab_parallel_cross_entropy(made.float(), labels).backward(upstream)

    def fused() -> None:
        made = logits.detach().requires_grad_() * 1
        fused_vocab_parallel_cross_entropy(made, labels, args.vocab, grad_in_place=True).backward(upstream)

    base_ms, base_gb = _time_ms(megatron, args.repeats)
    fused_ms, fused_gb = _time_ms(fused, args.repeats)
    result = {"tokens": args.tokens, "vocab": args.vocab, "device": torch.cuda.get_device_name(),
              "megatron_fp32_ms": base_ms, "megatron_fp32_peak_added_gb": base_gb,
              "fused_ms": fused_ms, "fused_peak_added_gb": fused_gb, "speedup": base_ms / fused_ms}
    _report(result, f"fused {fused_ms:.2f} ms vs Megatron fp32 {base_ms:.2f} ms: {base_ms / fused_ms:.2f}x; "
                    f"memory added {fused_gb:.2f} vs {base_gb:.2f} GB", args.out)


def _report(result: dict, summary: str, out: str | None) -> None:
    """The result as JSON and a one-line summary on stdout, and the JSON in ``out`` if given."""
    print(json.dumps(result, indent=1))
    print(summary)
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
