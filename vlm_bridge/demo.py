"""``vlm-bridge demo``: the whole bridge on a tiny Qwen2.5-VL built locally (no downloads).

Steps: build a random tiny checkpoint with a real tokenizer, chat template and processor; import it
into Megatron-Core at TP=2 (two processes); verify logits against HF at TP=1 x PP=2 from that
checkpoint (a different layout than it was saved with); export back to HF; check the round trip is
bit-exact.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from vlm_bridge.cli import format_report


def _step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.time()


def run_demo(workdir: str) -> int:
    from vlm_bridge.convert.engine import export_hf, import_hf
    from vlm_bridge.parallel import ParallelConfig, run_parallel
    from vlm_bridge.testing.checks import checkpoint_mismatches
    from vlm_bridge.testing.tiny_qwen2_5_vl import build_tiny_qwen2_5_vl
    from vlm_bridge.verify import DEFAULT_PROMPT, verify

    root = Path(workdir)
    shutil.rmtree(root, ignore_errors=True)
    start = _step("1/5 build a tiny Qwen2.5-VL (random weights, real tokenizer and processor)")
    hf = build_tiny_qwen2_5_vl(root / "hf")
    print(f"   {hf} ({time.time() - start:.1f}s)")

    start = _step("2/5 import into Megatron-Core at TP=2")
    tp2 = ParallelConfig(tp=2)
    run_parallel(import_hf, 2, str(hf), str(root / "megatron"), tp2, None, False)
    print(f"   {root / 'megatron'} ({time.time() - start:.1f}s)")

    start = _step("3/5 verify against HF, loading the checkpoint at PP=2 (two images, a video, text)")
    pp2 = ParallelConfig(pp=2)
    report = run_parallel(
        verify, 2, str(hf), str(root / "megatron"), pp2, [], None, DEFAULT_PROMPT, None, None
    )
    print(format_report(report))

    start = _step("4/5 export back to HF safetensors")
    run_parallel(export_hf, 1, str(root / "megatron"), str(root / "hf_export"), ParallelConfig(),
                 None, False)
    print(f"   {root / 'hf_export'} ({time.time() - start:.1f}s)")

    _step("5/5 round trip HF -> Megatron -> HF")
    bad = checkpoint_mismatches(hf, root / "hf_export")
    print("   bit-exact: all tensors equal" if not bad else f"   MISMATCH: {bad[:5]}")
    ok = report["passed"] and not bad
    print("\ndemo " + ("passed" if ok else "FAILED"))
    return 0 if ok else 1
