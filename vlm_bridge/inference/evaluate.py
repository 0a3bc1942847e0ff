"""Evaluation of a model on held-out conversations: the training loss on assistant turns (and its
perplexity), and generated answers scored against the references.

The loss is the trainer's: samples are encoded by the same encoder, run through the same loss step
and pipeline schedule, and averaged per token over the whole set, so it equals the training loss
on the same samples. Answers come from :mod:`vlm_bridge.inference.generate` on each conversation
minus its final assistant turn; the references are that turn's text, or a sample's ``answers``
list (DocVQA-style sets of accepted answers).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from vlm_bridge.convert.hf_io import strict_json, write_text_atomic
from vlm_bridge.inference.generate import Sampling
from vlm_bridge.inference.metrics import resolve_metric, score_value
from vlm_bridge.inference.requests import request_from_sample
from vlm_bridge.parallel import device


@dataclass
class EvalOptions:
    """What ``evaluate`` (and validation during fine-tuning) computes."""

    generate: bool = True  # also generate answers and score them
    metrics: tuple[str, ...] = ("exact_match", "anls")
    max_new_tokens: int = 64
    batch_size: int = 8  # prompts decoded together
    micro_batch_size: int = 4  # samples per loss forward
    seq_len: int = 4096  # longer samples are truncated as in training
    max_samples: int | None = None
    metric_option: str = "--metric"  # what a metric's error calls the setting (eval.metrics in fine-tuning)
    extra: dict = field(default_factory=dict)


def eval_loss(model, family, settings, encoded: list, micro_batch_size: int,
              pad_id: int) -> tuple[float, float]:
    """Summed loss and loss-token count of ``encoded`` samples (every rank; data-parallel ranks
    share the micro-batches)."""
    from vlm_bridge.inference.requests import plan_batches
    from vlm_bridge.train.batching import collate_padded, has_video
    from vlm_bridge.train.loss import global_loss_totals, loss_forward_step

    if not encoded:
        return 0.0, 0.0
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    # Pipeline stages exchange fixed shapes: one length and full micro-batches.
    mbs = 1 if pp > 1 else micro_batch_size
    length = max(len(s) for s in encoded) if pp > 1 else None
    # A family that takes a video only in a batch of its own gets each video sample alone.
    groups = plan_batches([has_video(s) for s in encoded], mbs, family.video_batch_alone)
    batches = [collate_padded([encoded[i] for i in group], family, settings, pad_id, length)
               for group in groups]
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    while len(batches) % dp:  # every rank runs as many forwards (experts exchange tokens); add nothing
        batches.append(dataclasses.replace(batches[0], loss_mask=torch.zeros_like(batches[0].loss_mask)))
    mine = [mb.to(device()) for mb in batches[dp_rank::dp]]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=loss_forward_step, data_iterator=iter(mine), model=[model],
            num_microbatches=len(mine), seq_length=mine[0].labels.shape[1],
            micro_batch_size=mine[0].labels.shape[0], forward_only=True,
        )
    model.train(was_training)
    return global_loss_totals(outputs)


def references_of(sample: dict, reference: str | None) -> list[str]:
    answers = sample.get("answers")
    if isinstance(answers, list) and all(isinstance(a, str) for a in answers) and answers:
        return answers
    return [reference] if reference is not None else []


def evaluate_model(built, loss_model, processor, samples: list[dict], options: EvalOptions) -> dict:
    """Run on every rank: the report (loss, perplexity, metrics, answers) for ``samples``."""
    from vlm_bridge.data.encode import SampleEncoder
    from vlm_bridge.inference.requests import ensure_pad_token

    if options.max_samples is not None:
        samples = samples[: options.max_samples]
    if not samples:
        raise ValueError("the evaluation data holds no samples")
    tokenizer = getattr(processor, "tokenizer", processor)
    ensure_pad_token(tokenizer)
    encoder = SampleEncoder(processor, options.seq_len)
    encoded = [e for i, s in enumerate(samples) if (e := encoder.encode(s, f"sample {i}")) is not None]
    total, tokens = eval_loss(loss_model, built.family, built.settings, encoded, options.micro_batch_size,
                              tokenizer.pad_token_id)
    report: dict[str, Any] = {"samples": len(samples), "loss_samples": len(encoded),
                              # truncated samples are scored (on what fits): not skipped
                              "skipped": {k: v for k, v in encoder.stats.items()
                                          if k not in ("encoded", "truncated")},
                              "truncated": encoder.stats.get("truncated", 0), "loss_tokens": int(tokens)}
    if tokens:
        report["loss"] = total / tokens
        report["perplexity"] = math.exp(min(report["loss"], 700.0))
    if options.generate:
        report.update(_answers(built, processor, samples, options))
    return report


def _answers(built, processor, samples: list[dict], options: EvalOptions) -> dict:
    from vlm_bridge.inference.command import run_generation

    requests = [request_from_sample(s, f"sample {i}") for i, s in enumerate(samples)]
    sampling = Sampling(max_new_tokens=options.max_new_tokens)
    was_training = built.model.training
    answers = run_generation(built, processor, requests, sampling, options.batch_size)
    built.model.train(was_training)
    refs = [references_of(s, r.reference) for s, r in zip(samples, requests)]
    rows, means = score_answers([a["answer"] for a in answers], refs, options.metrics, options.metric_option)
    for row, answer in zip(rows, answers):
        row["finish"] = answer["finish"]
    return {"scored": sum("scores" in row for row in rows), "metrics": means, "answers": rows}



def score_answers(predictions: list[str], references: list[list[str]], metrics: tuple[str, ...],
                  option: str = "--metric") -> tuple[list[dict], dict[str, float]]:
    """Per-answer rows (with scores where there are references) and each metric's mean over the
    scored answers; an answer a metric gives nan (no score) is left out of that metric's mean (its
    row keeps the nan; a metric with no score at all has mean nan)."""
    functions = {name: resolve_metric(name, option) for name in metrics}
    rows, sums, counts = [], dict.fromkeys(functions, 0.0), dict.fromkeys(functions, 0)
    for index, (answer, refs) in enumerate(zip(predictions, references, strict=True)):
        row: dict[str, Any] = {"index": index, "answer": answer, "references": refs}
        if refs:
            row["scores"] = {name: score_value(name, metric, answer, refs, option)
                             for name, metric in functions.items()}
            for name, value in row["scores"].items():
                if not math.isnan(value):
                    sums[name] += value
                    counts[name] += 1
        rows.append(row)
    if not any("scores" in row for row in rows):
        return rows, {}
    return rows, {name: sums[name] / counts[name] if counts[name] else math.nan for name in functions}


def unscored_counts(rows: list[dict]) -> dict[str, int]:
    """How many scored answers each metric gave nan (no score), where any."""
    out: dict[str, int] = {}
    for row in rows:
        for name, value in row.get("scores", {}).items():
            if value is None or math.isnan(value):
                out[name] = out.get(name, 0) + 1
    return out


def format_report(report: dict) -> str:
    truncated = f"; {report['truncated']} truncated to --seq-len" if report.get("truncated") else ""
    lines = [f"samples        {report['samples']} (loss on {report['loss_samples']}; "
             f"skipped {sum(report['skipped'].values())}{truncated})"]
    if "loss" in report:
        lines.append(f"loss           {report['loss']:.4f} over {report['loss_tokens']} answer tokens "
                     f"(perplexity {report['perplexity']:.3f})")
    unscored = unscored_counts(report.get("answers", []))
    for name, value in report.get("metrics", {}).items():
        scored = report["scored"] - unscored.get(name, 0)
        if value is None or math.isnan(value):
            lines.append(f"{name:<14} no score: the metric gave nan on all {report['scored']} answers")
            continue
        missing = f" (nan on {unscored[name]}, left out)" if name in unscored else ""
        lines.append(f"{name:<14} {100 * value:.1f}% of {scored} answers{missing}")
    return "\n".join(lines)


def evaluate_command(hf_model: str | None, megatron_path: str | None, parallel, data: str,
                     options: EvalOptions, dtype_arg: str | None, report_path: str | None) -> dict:
    """Run on every rank; rank 0 writes the JSON report and returns it."""
    from vlm_bridge.data.sources import load_source
    from vlm_bridge.inference.command import load_for_inference
    from vlm_bridge.loading import load_processor
    from vlm_bridge.parallel import init_distributed

    init_distributed(parallel)
    samples = list(load_source(data))
    built = load_for_inference(hf_model, megatron_path, parallel, dtype_arg)
    processor = load_processor(built.hf_side_dir)
    report = evaluate_model(built, built.model, processor, samples, options)
    if dist.get_rank() != 0:
        return {}
    report["data"] = data
    if report_path:
        write_text_atomic(report_path, strict_json(report, indent=2, ensure_ascii=False) + "\n")
    return report
