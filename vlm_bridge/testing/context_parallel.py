"""Context-parallel checks run on ranks: logits of the verify batches and of a packed row at any
layout (gathered to rank 0), and the reduced gradients of one training step."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from vlm_bridge.parallel import ParallelConfig, init_distributed
from vlm_bridge.runtime import last_stage_rank, on_device, pipeline_forward_logits, to_rank0


def packed_samples(family, shapes_jsonl: str | Path, video: str | None) -> list[dict]:
    """Two image conversations, a text-only one and (for families with video) a video one."""
    import json

    folder = Path(shapes_jsonl).parent
    rows = [json.loads(line) for line in Path(shapes_jsonl).read_text().splitlines()[:2]]
    for row in rows:
        row["messages"][0]["content"][0]["image"] = str(folder / row["messages"][0]["content"][0]["image"])
    rows.append({"messages": [{"role": "user", "content": "Name a colour."},
                              {"role": "assistant", "content": "Blue."}]})
    if video is not None and "video" in family.modalities:
        rows.append({"messages": [
            {"role": "user", "content": [{"type": "video", "video": video},
                                         {"type": "text", "text": "What moves?"}]},
            {"role": "assistant", "content": "A square."}]})
    return rows


def layout_logits(hf_dir: str, parallel: ParallelConfig, samples: list[dict], extra_padding: int = 7) -> dict:
    """Run on every rank: fp32 logits (rank 0, CPU, whole sequences) of verify's batches (images,
    video, text, left-padded) and of ``samples`` packed into one row with ``extra_padding``
    padding tokens at its end."""
    from vlm_bridge.data.encode import SampleEncoder
    from vlm_bridge.inference.requests import ensure_pad_token
    from vlm_bridge.loading import load_hf, load_processor
    from vlm_bridge.train.batching import collate_packed
    from vlm_bridge.verify import DEFAULT_PROMPT, default_media, verify_batches

    init_distributed(parallel)
    built = load_hf(hf_dir, parallel, torch.float32)
    built.model.eval()
    processor = load_processor(hf_dir)
    images, frames = default_media()
    if "video" not in built.family.modalities:
        frames = None
    family, settings = built.family, built.settings
    batches = verify_batches(family, processor, images, frames, DEFAULT_PROMPT)
    inputs = [family.model_inputs(settings, dict(b)) for b in batches]
    ensure_pad_token(processor.tokenizer)
    encoder = SampleEncoder(processor, 4096)
    encoded = [encoder.encode(s) for s in samples]
    length = sum(len(e) for e in encoded) + extra_padding
    pad_id = processor.tokenizer.pad_token_id
    inputs.append(collate_packed([encoded], family, settings, length, pad_id).inputs)
    source = last_stage_rank()
    out = []
    for kwargs in inputs:
        logits = pipeline_forward_logits(built.model, on_device(kwargs))
        logits = logits[..., : settings.vocab_size].float() if logits is not None else None
        out.append(to_rank0(logits, source))
    # numpy: pickled by value (a spawned rank may exit before shared tensor storage is received)
    return {"logits": [t.numpy() for t in out]} if dist.get_rank() == 0 else {}


def step_gradients(cfg) -> dict:
    """Run on every rank: the loss and every parameter's reduced gradient (rank 0, CPU) after one
    forward/backward of the training step (before the update)."""
    from vlm_bridge.train.trainer import _global_loss, forward_backward, setup

    run = setup(cfg)
    run.model.train()
    outputs, _ = forward_backward(run)
    loss = _global_loss(outputs)
    grads = {name: p.main_grad.detach().float().cpu().numpy()
             for name, p in run.built.model.named_parameters() if getattr(p, "main_grad", None) is not None}
    return {"loss": loss, "grads": grads} if dist.get_rank() == 0 else {}
