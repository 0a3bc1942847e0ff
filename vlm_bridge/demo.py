"""``vlm-bridge demo``: the whole bridge on a family's tiny model built locally (no downloads).

Steps: build a random tiny checkpoint with a real tokenizer, chat template and processor; import it
into Megatron-Core at TP=2 (two processes); verify logits against HF at TP=1 x PP=2 from that
checkpoint (a different layout than it was saved with); export back to HF; check the round trip is
bit-exact; then fine-tune it on a synthetic shapes-and-colours task (held-out accuracy before and
after, loss plot), then answer held-out questions with our own KV-cached generation on the
fine-tuned Megatron checkpoint (answers next to the truth, exact-match accuracy).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from vlm_bridge.families import DEMO_FAMILY
from vlm_bridge.verify import format_report


def _step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.time()


def run_demo(workdir: str, finetune: bool = True, family_name: str = DEMO_FAMILY) -> int:
    from vlm_bridge.loading import export_hf, import_hf
    from vlm_bridge.parallel import ParallelConfig, run_parallel
    from vlm_bridge.registry import family_by_name
    from vlm_bridge.testing.checks import checkpoint_mismatches
    from vlm_bridge.verify import DEFAULT_PROMPT, verify

    root = Path(workdir)
    shutil.rmtree(root, ignore_errors=True)
    family = family_by_name(family_name)
    start = _step(f"1/8 build a tiny {family.name} (random weights, real tokenizer and processor)")
    hf = family.build_tiny(root / "hf")
    print(f"   {hf} ({time.time() - start:.1f}s)")

    start = _step("2/8 import into Megatron-Core at TP=2")
    tp2 = ParallelConfig(tp=2)
    run_parallel(import_hf, 2, str(hf), str(root / "megatron"), tp2, None, False)
    print(f"   {root / 'megatron'} ({time.time() - start:.1f}s)")

    start = _step("3/8 verify against HF, loading the checkpoint at PP=2 (two images, a video, text)")
    pp2 = ParallelConfig(pp=2)
    report = run_parallel(
        verify, 2, str(hf), str(root / "megatron"), pp2, [], None, DEFAULT_PROMPT, None, None
    )
    print(format_report(report))

    start = _step("4/8 export back to HF safetensors")
    run_parallel(export_hf, 1, str(root / "megatron"), str(root / "hf_export"), ParallelConfig(),
                 None, False)
    print(f"   {root / 'hf_export'} ({time.time() - start:.1f}s)")

    _step("5/8 round trip HF -> Megatron -> HF")
    bad = checkpoint_mismatches(hf, root / "hf_export")
    print("   bit-exact: all tensors equal" if not bad else f"   MISMATCH: {bad[:5]}")
    ok = report["passed"] and not bad
    if finetune:
        ok = run_finetune_demo(root, root / "megatron") and ok
    print("\ndemo " + ("passed" if ok else "FAILED"))
    return 0 if ok else 1


def run_finetune_demo(root: Path, pretrained: Path, steps: int = 120) -> bool:
    """Fine-tune the tiny model on the shapes task; accuracy before, plot, our generate after."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlm_bridge.parallel import run_parallel
    from vlm_bridge.recipes import get_recipe
    from vlm_bridge.testing.shapes_task import choice_accuracy, make_task
    from vlm_bridge.train.trainer import train

    start = _step("6/8 synthetic task: one coloured shape per image, questions on colour or shape")
    task = make_task(root / "shapes", n_train=384, n_eval=48, size=56, seed=7)
    processor = AutoProcessor.from_pretrained(root / "hf")
    before = choice_accuracy(AutoModelForImageTextToText.from_pretrained(root / "hf"), processor,
                             task["eval"])
    print(f"   held-out accuracy before fine-tuning: {100 * before:.1f}% (chance about 29%)")

    start = _step(f"7/8 fine-tune on Megatron-Core ({steps} steps, packed sequences)")
    cfg = get_recipe("demo_tiny")
    cfg.pretrained, cfg.output_dir, cfg.steps = str(pretrained), str(root / "finetune"), steps
    cfg.data.train = f"jsonl:{task['train']}"
    cfg.checkpoint.export_hf = True
    result = run_parallel(train, 1, cfg)
    print(f"   loss {result['losses'][0]:.3f} -> {result['losses'][-1]:.3f} in "
          f"{time.time() - start:.0f}s; plot: {root / 'finetune' / 'loss.png'}")

    _step("8/8 answer held-out questions with vlm-bridge generate on the fine-tuned Megatron checkpoint")
    report = answer_held_out(root / "finetune", task["eval"])
    export = root / "finetune" / "checkpoints" / f"iter_{steps:07d}" / "hf_export"
    after = choice_accuracy(AutoModelForImageTextToText.from_pretrained(export), processor, task["eval"])
    print(f"   its HF export, scored by answer likelihood as before fine-tuning: {100 * after:.1f}%")
    return report["metrics"]["exact_match"] >= 0.6


def answer_held_out(run_dir: Path, eval_jsonl: Path, shown: int = 6) -> dict:
    """Greedy answers from the newest checkpoint of ``run_dir`` (our KV-cached generate), a few
    shown next to the truth, and the exact-match accuracy over every held-out question."""
    import json

    from vlm_bridge.inference.evaluate import EvalOptions, evaluate_command, format_report
    from vlm_bridge.parallel import ParallelConfig, run_parallel

    options = EvalOptions(metrics=("exact_match",), max_new_tokens=8, batch_size=16)
    report = run_parallel(evaluate_command, 1, None, str(run_dir), ParallelConfig(), f"jsonl:{eval_jsonl}",
                          options, None, str(run_dir / "eval_report.json"))
    rows = [json.loads(line) for line in Path(eval_jsonl).read_text().splitlines()]
    for row, answer in list(zip(rows, report["answers"]))[:shown]:
        question = row["messages"][0]["content"][1]["text"]
        mark = "ok " if answer["scores"]["exact_match"] else "   "
        truth = answer["references"][0]
        print(f"   {mark}Q: {question:<28} generated: {answer['answer']!r:<12} truth: {truth}")
    print("   " + format_report(report).replace("\n", "\n   "))
    print(f"   report: {run_dir / 'eval_report.json'}")
    return report
