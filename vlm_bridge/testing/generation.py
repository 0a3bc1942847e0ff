"""Generation checks run on ranks (tests and the demo): our decoding against HF ``generate``, and the
KV-cache path against a full forward over the whole generated sequence."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from vlm_bridge.inference.generate import Sampling, generate_tokens
from vlm_bridge.inference.requests import Request, build_prompt_batch, request_from_args
from vlm_bridge.parallel import ParallelConfig, device, init_distributed
from vlm_bridge.runtime import on_device, pipeline_forward_logits


def parity_requests(family, media: dict[str, str]) -> list[list[Request]]:
    """Batches covering what the family takes: two images, a video, text only, and prompts of
    different lengths side by side (left padding). ``media`` names files: image_a, image_b, video."""
    both = [media["image_a"], media["image_b"]]
    two_images = request_from_args("Describe both pictures in detail.", both, None)
    short = request_from_args("Hi.", [], None)
    long = request_from_args("Count the colours you know and name three of them, one per line.", [], None)
    one_image = request_from_args("What is this?", [media["image_b"]], None)
    batches = [[two_images, short, long, one_image]]
    if "video" in family.modalities:
        video = request_from_args("What happens in the clip?", [], media["video"])
        batches.append([video] if family.video_batch_alone else [video, short])
    return batches


def _stop_ids(hf_dir: str, processor) -> tuple[int, ...]:
    from vlm_bridge.inference.command import stop_token_ids

    return stop_token_ids(hf_dir, getattr(processor, "tokenizer", processor))


def hf_generate(hf_dir: str, batch, max_new_tokens: int, stops: tuple[int, ...]) -> list[list[int]]:
    """HF ``generate`` (greedy, fp32) on the same processor outputs; new tokens up to the first stop."""
    from vlm_bridge.verify import load_hf_reference

    model = load_hf_reference(hf_dir, torch.float32).to(device()).eval()
    batch = batch.to(device())
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    rows = []
    for seq in out[:, batch["input_ids"].shape[1]:].tolist():
        cut = next((i for i, t in enumerate(seq) if t in stops), len(seq))
        rows.append(seq[:cut])
    return rows


def generation_parity(hf_dir: str, parallel: ParallelConfig, batches: list[list[Request]],
                      max_new_tokens: int, check_cache: bool = True, decode: str = "auto") -> dict:
    """Run on every rank: greedy tokens of ours and HF's per batch, and (``check_cache``) the largest
    difference between each step's cached logits and a full forward's logits at that position."""
    from vlm_bridge.loading import load_hf, load_processor

    init_distributed(parallel)
    # fp32 means fp32 on a GPU too: no TF32 convolutions (HF's patch embeddings) on one side only.
    torch.backends.cudnn.allow_tf32 = False
    built = load_hf(hf_dir, parallel, torch.float32)
    processor = load_processor(hf_dir)
    stops = _stop_ids(hf_dir, processor)
    sampling = Sampling(max_new_tokens=max_new_tokens, stop_token_ids=stops)
    report: dict = {"ours": [], "hf": [], "cache_max_diff": 0.0, "steps": 0}
    for requests in batches:
        batch = build_prompt_batch(processor, requests)
        out = generate_tokens(built, batch, sampling, trace=True, decode=decode)
        report["ours"].append(out.tokens)
        report["steps"] += out.steps
        if check_cache:
            diff = _cache_vs_full(built, batch, out.extra)
            if diff is not None:
                report["cache_max_diff"] = max(report["cache_max_diff"], diff)
        if dist.get_rank() == 0:
            report["hf"].append(hf_generate(hf_dir, batch, max_new_tokens, stops))
    return report if dist.get_rank() == 0 else {}


def _cache_vs_full(built, batch, extra: dict) -> float | None:
    """Max |logit diff| between the cached steps and one forward over prompt + every fed token."""
    fed = torch.stack(extra["fed"][:-1], dim=1) if len(extra["fed"]) > 1 else None
    full = dict(batch)
    if fed is not None:
        rows, extra_len = fed.shape
        full["input_ids"] = torch.cat([batch["input_ids"], fed], dim=1)
        full["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones_like(fed)], dim=1)
        for key in built.family.token_keys:  # per-token extras of generated text: zeros
            if key in full:
                full[key] = torch.cat([full[key], full[key].new_zeros(rows, extra_len)], dim=1)
    inputs = built.family.model_inputs(built.settings, full)
    logits = pipeline_forward_logits(built.model, on_device(inputs))
    if logits is None:
        return None
    prompt = batch["input_ids"].shape[1]
    vocab = built.settings.vocab_size
    worst = 0.0
    for step, cached in enumerate(extra["logits"]):
        reference = logits[:, prompt - 1 + step, :vocab].float().cpu()
        worst = max(worst, float((reference - cached).abs().max()))
    return worst


def write_parity_media(folder: Path) -> dict[str, str]:
    """Two images and a short mp4 for generation tests (written here, nothing downloaded)."""
    from vlm_bridge.testing.media import make_image, make_video_frames

    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, (w, h, seed) in {"image_a": (224, 168, 1), "image_b": (112, 224, 2)}.items():
        paths[name] = str(folder / f"{name}.png")
        make_image(w, h, seed=seed).save(paths[name])
    frames_dir = folder / "clip_frames"
    frames_dir.mkdir(exist_ok=True)
    for i, frame in enumerate(make_video_frames(4, 112, 112, seed=3)):
        frame.save(frames_dir / f"{i:03d}.png")
    paths["video"] = str(frames_dir)
    return paths


def sampling_runs(hf_dir: str, requests: list[Request], samplings: list[Sampling],
                  stop_after: int = 3) -> dict:
    """Run on one rank: tokens and finish reasons per sampling config, plus a greedy run that stops
    at the token greedy decoding produced at step ``stop_after`` of row 0."""
    from dataclasses import replace

    from vlm_bridge.loading import load_hf, load_processor

    init_distributed(ParallelConfig())
    built = load_hf(hf_dir, ParallelConfig(), torch.float32)
    batch = build_prompt_batch(load_processor(hf_dir), requests)
    runs = [generate_tokens(built, batch, sampling) for sampling in samplings]
    stop = runs[0].tokens[0][stop_after]
    stopped = generate_tokens(built, batch, replace(samplings[0], stop_token_ids=(stop,)))
    return {"runs": [(r.tokens, r.finish) for r in runs], "stop": stop,
            "stopped": (stopped.tokens, stopped.finish)}


def batch_size_runs(hf_dir: str, requests: list[Request], sampling: Sampling, sizes: list[int]) -> dict:
    """Run on one rank: each request's tokens when the requests are generated ``size`` at a time."""
    from vlm_bridge.inference.command import run_generation
    from vlm_bridge.loading import load_hf, load_processor

    init_distributed(ParallelConfig())
    built = load_hf(hf_dir, ParallelConfig(), torch.float32)
    processor = load_processor(hf_dir)
    return {size: [a["answer"] for a in run_generation(built, processor, requests, sampling, size)]
            for size in sizes}
