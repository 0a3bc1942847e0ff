"""``vlm-bridge generate`` on every rank: load the model, batch the requests, generate, write answers."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import torch.distributed as dist

from vlm_bridge.convert.engine import DTYPES, META_FILE
from vlm_bridge.inference.generate import Generated, Sampling, generate_tokens
from vlm_bridge.inference.requests import Request, build_prompt_batch, plan_batches, write_jsonl_atomic
from vlm_bridge.loading import FOREIGN_MEGATRON, foreign_megatron
from vlm_bridge.parallel import ParallelConfig, init_distributed


def resolve_megatron_path(path: str | Path, hf_hint: str = "pass it as --hf-model") -> Path:
    """A vlm-bridge checkpoint folder; a training run's checkpoint root (or the run folder above it)
    resolves to its newest complete iteration. ``hf_hint``: what to do with an HF folder instead."""
    from vlm_bridge.train.checkpoint import iteration_dir, latest_step

    path = Path(path)
    if foreign_megatron(path) and not (path / META_FILE).is_file():
        raise FileNotFoundError(f"{path}: {FOREIGN_MEGATRON}")
    roots = [path, path / "checkpoints"]
    run_config = _json_object(path / "config.json")  # a run whose checkpoint.dir is elsewhere
    checkpoint = run_config.get("checkpoint") if run_config else None
    elsewhere = checkpoint.get("dir") if isinstance(checkpoint, dict) else None
    if isinstance(elsewhere, str) and elsewhere:
        roots.append(Path(elsewhere))
    for root in roots:
        if (root / META_FILE).is_file():
            return root
        step = latest_step(root) if root.is_dir() else None
        if step is not None:
            return iteration_dir(root, step)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such folder (a vlm-bridge Megatron checkpoint was expected)")
    hint = f"; it is a Hugging Face model folder: {hf_hint}" if run_config and (
        "architectures" in run_config or "model_type" in run_config) else ""
    raise FileNotFoundError(
        f"{path}: not a vlm-bridge Megatron checkpoint (no {META_FILE}, no iter_* folder){hint}")


def resolve_pretrained(path: str) -> str:
    """``finetune --pretrained``: an HF folder or a checkpoint as given; a training run's folder (or
    its checkpoint root) resolves to its newest checkpoint, as verify, export and evaluate take it
    (its own config.json is the run's, which names no model)."""
    folder = Path(path)
    if not path or (folder / META_FILE).is_file():
        return path
    config = _json_object(folder / "config.json")
    if config is not None and ("model_type" in config or "architectures" in config):
        return path  # an HF folder
    try:
        return str(resolve_megatron_path(folder))
    except FileNotFoundError:
        if foreign_megatron(folder):
            raise
        return path  # neither: the loader names what is wrong


def _json_object(file: Path) -> dict | None:
    """The JSON object in ``file``; None where there is no file or no object in it."""
    try:
        value = json.loads(file.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def load_for_inference(hf_model: str | None, megatron_path: str | None, parallel: ParallelConfig,
                       dtype_arg: str | None):
    """This rank's model from a Megatron checkpoint (LoRA adapters merged) or an HF folder."""
    from vlm_bridge.loading import load_hf, load_megatron

    dtype = DTYPES[dtype_arg] if dtype_arg else None
    if megatron_path:
        return load_megatron(str(resolve_megatron_path(megatron_path)), parallel, dtype)[0]
    return load_hf(hf_model, parallel, dtype)


def stop_token_ids(hf_dir: str | Path, tokenizer) -> tuple[int, ...]:
    """The generation config's EOS tokens (one id or a list); without a generation_config.json,
    the one transformers derives from config.json (as ``generate`` does); else the tokenizer's EOS."""
    from transformers import GenerationConfig

    from vlm_bridge.loading import load_hf_config

    eos = None
    if (Path(hf_dir) / "generation_config.json").is_file():
        eos = GenerationConfig.from_pretrained(hf_dir, local_files_only=True).eos_token_id
    elif (Path(hf_dir) / "config.json").is_file():
        eos = GenerationConfig.from_model_config(load_hf_config(hf_dir)).eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list | tuple) else (int(eos),)


# Decoding when neither the command nor the generation config says.
DEFAULT_MAX_NEW_TOKENS = 128


def generation_defaults(hf_dir: str | Path) -> tuple[dict, list[str]]:
    """What ``generate`` decodes with where its options are unset, from the folder's
    generation_config.json as transformers' ``generate`` reads it: its ``max_new_tokens``, and
    with ``do_sample`` its temperature, top-p and top-k (else greedy: temperature 0). Also the
    config's settings that are not applied, as notes."""
    from transformers import GenerationConfig

    config = None
    if (Path(hf_dir) / "generation_config.json").is_file():
        config = GenerationConfig.from_pretrained(hf_dir, local_files_only=True)
    defaults = {"max_new_tokens": getattr(config, "max_new_tokens", None) or DEFAULT_MAX_NEW_TOKENS,
                "temperature": 0.0, "top_p": 1.0, "top_k": 0}
    if config is None:
        return defaults, []
    if config.do_sample:
        defaults.update(temperature=config.temperature if config.temperature is not None else 1.0,
                        top_p=config.top_p if config.top_p is not None else 1.0, top_k=config.top_k or 0)
    ignored = [f"{name} {getattr(config, name)}" for name, neutral in (
        ("repetition_penalty", 1.0), ("no_repeat_ngram_size", 0), ("num_beams", 1), ("min_p", None))
        if getattr(config, name, neutral) not in (neutral, None)]
    notes = [f"generation_config.json's {', '.join(ignored)} not applied (sampling and greedy decoding "
             "only)"] if ignored else []
    return defaults, notes


class _Streamer:
    """Prints a single request's answer as it grows (rank 0 only)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.shown = tokenizer, ""

    def __call__(self, tokens: list[list[int]]) -> None:
        text = self.tokenizer.decode(tokens[0], skip_special_tokens=True)
        if text.startswith(self.shown) and len(text) > len(self.shown):
            sys.stdout.write(text[len(self.shown):])
            sys.stdout.flush()
            self.shown = text


def run_generation(built, processor, requests: list[Request], sampling: Sampling, batch_size: int,
                   stream: bool = False, video_fps: float | None = None) -> list[dict]:
    """Answers for every request (on every rank), in request order."""
    tokenizer = getattr(processor, "tokenizer", processor)
    if not sampling.stop_token_ids:
        sampling = replace(sampling, stop_token_ids=stop_token_ids(built.hf_side_dir, tokenizer))
    answers: list[dict] = [{} for _ in requests]
    for indices in plan_batches([r.has_video for r in requests], batch_size, built.family.video_batch_alone):
        batch = build_prompt_batch(processor, [requests[i] for i in indices], video_fps)
        streamer = _Streamer(tokenizer) if stream and dist.get_rank() == 0 else None
        out: Generated = generate_tokens(built, batch, sampling, on_step=streamer, row_ids=indices,
                                         warn_past_positions=True)
        if streamer is not None:
            print(flush=True)
        for row, index in enumerate(indices):
            answers[index] = {
                "answer": tokenizer.decode(out.tokens[row], skip_special_tokens=True).strip(),
                "tokens": len(out.tokens[row]),
                "finish": out.finish[row],
                "reference": requests[index].reference,
            }
    return answers


def generate_command(hf_model: str | None, megatron_path: str | None, parallel: ParallelConfig,
                     requests: list[Request], sampling: Sampling, batch_size: int, dtype_arg: str | None,
                     output: str | None, stream: bool) -> dict:
    """Run on every rank; rank 0 writes ``output`` (JSONL) and returns the answers."""
    from vlm_bridge.loading import load_processor

    init_distributed(parallel, seed=sampling.seed if sampling.seed is not None else 1234)
    built = load_for_inference(hf_model, megatron_path, parallel, dtype_arg)
    processor = load_processor(built.hf_side_dir)
    answers = run_generation(built, processor, requests, sampling, batch_size, stream)
    if dist.get_rank() != 0:
        return {}
    if output:
        write_jsonl_atomic(output, [{"index": i, **a} for i, a in enumerate(answers)])
    return {"answers": answers, "dtype": str(built.dtype).removeprefix("torch.")}

