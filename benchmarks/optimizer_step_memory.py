"""Host memory the optimizer step adds to a bf16 full fine-tune with bf16 gradients and bf16 Adam
moments: Megatron's fp32 copy of every gradient against the gradients handed over as they are
(``train/decoupled_grads.py``), each in a fresh process, in one run.

    python benchmarks/optimizer_step_memory.py [--hidden 2048] [--ffn 8192] [--layers 4] [--workdir DIR]

A Qwen2.5-VL of the tiny builder's vision tower and tokenizer with a widened language model (random
weights) takes one training step (which creates the moments), then a forward and backward, then the
measured optimizer step: resident memory is sampled every millisecond during that step; the figure
is its peak minus the resident memory just before it. The same step on a GPU allocates the same
tensors (the fp32 copies: 4 bytes a parameter); this run measures them on the CPU, where the
benchmark can run anywhere. Prints one JSON line, then a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _measured_step(cfg) -> dict:
    from vlm_bridge.train.trainer import forward_backward, setup, train_step

    run = setup(cfg)
    train_step(run)  # creates the moments: the state the measured step starts from
    forward_backward(run)
    before, peak, done = _rss(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    start = time.perf_counter()
    run.optimizer.step()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    params = sum(p.numel() for p in run.model.module.parameters() if p.requires_grad)
    added = max(peak[0], before) - before
    return {"params": params, "rss_before_gb": before / 1e9, "step_added_gb": added / 1e9, "step_s": seconds}


def child(args) -> None:
    from vlm_bridge.parallel import run_parallel
    from vlm_bridge.recipes import get_recipe
    from vlm_bridge.train.config import apply_overrides

    cfg = apply_overrides(get_recipe("demo_tiny"), [
        "dtype=bf16", "optim.moments=bf16", "optim.grad_reduce_in_fp32=false", "steps=3",
        "global_batch_size=2", "micro_batch_size=1", "tensorboard=false", "checkpoint.save_every=0"])
    cfg.pretrained, cfg.output_dir = args.model, str(Path(args.workdir) / f"run_{args.child}")
    cfg.data.train = f"jsonl:{args.data}"
    print(json.dumps(run_parallel(_measured_step, 1, cfg)))


def build(args, workdir: Path) -> tuple[Path, Path]:
    from vlm_bridge.testing.shapes_task import make_task
    from vlm_bridge.testing.tiny_qwen2_5_vl import build_tiny_qwen2_5_vl

    if args.hidden % 256:  # 16 heads whose size splits into MRoPE's 2:3:3 sections of 16ths
        raise SystemExit(f"--hidden must be a multiple of 256, got {args.hidden}")
    heads, head_dim = 16, args.hidden // 16
    eighth = head_dim // 16  # mrope sections summing to head_dim / 2, split 2:3:3 as the tiny one
    text = {"hidden_size": args.hidden, "intermediate_size": args.ffn, "num_hidden_layers": args.layers,
            "max_window_layers": args.layers, "num_attention_heads": heads, "num_key_value_heads": 4,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                "mrope_section": [2 * eighth, 3 * eighth, 3 * eighth]}}
    model = build_tiny_qwen2_5_vl(workdir / "hf", seed=0, config_overrides={
        "text_config": text, "vision_config": {"out_hidden_size": args.hidden}})
    return model, Path(make_task(workdir / "shapes", n_train=8, n_eval=0)["train"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=8192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--workdir", default=None)
    p.add_argument("--out", default=None, help="also write the JSON result here")
    p.add_argument("--child", choices=("copy", "decoupled"), help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("CI", "1")
    if args.child:
        child(args)
        return
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="optstep_"))
    model, data = build(args, workdir)
    results = {}
    for mode in ("copy", "decoupled"):
        env = {**os.environ, "VLM_BRIDGE_DECOUPLED_GRADS": "1" if mode == "decoupled" else "0"}
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--model", str(model), "--data",
                              str(data), "--workdir", str(workdir)], env=env, capture_output=True, text=True,
                             check=True).stdout
        results[mode] = json.loads(out.strip().splitlines()[-1])
    params = results["copy"]["params"]
    ratio = results["decoupled"]["step_added_gb"] / max(results["copy"]["step_added_gb"], 1e-9)
    report = {"hidden": args.hidden, "ffn": args.ffn, "layers": args.layers, "params": params,
              "fp32_copy_gb": 4 * params / 1e9, **results, "decoupled_over_copy": ratio}
    print(json.dumps(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{params / 1e6:.0f}M trained parameters; 4 B/param fp32 copy = {4 * params / 1e9:.2f} GB")
    print(f"{'gradients to the step':<26}{'added by the step':>20}{'before it':>12}{'step s':>9}")
    for mode in ("copy", "decoupled"):
        r = results[mode]
        print(f"{mode:<26}{r['step_added_gb']:>17.2f} GB{r['rss_before_gb']:>9.2f} GB{r['step_s']:>9.2f}")
    print(f"decoupled / copy: {report['decoupled_over_copy']:.2f}x the memory the step adds")


if __name__ == "__main__":
    main()
