"""Checks shared by the demo and the tests."""

from __future__ import annotations

from pathlib import Path

import torch

from vlm_bridge.convert.hf_io import SafetensorsReader


def checkpoint_mismatches(a: str | Path, b: str | Path) -> list[str]:
    """Tensor names that differ between two HF folders: missing on one side, other dtype, or
    not bit-identical. Empty means a bit-exact match. Reads one tensor at a time."""
    with SafetensorsReader(a) as ra, SafetensorsReader(b) as rb:
        if ra.keys() != rb.keys():
            return sorted(set(ra.keys()) ^ set(rb.keys()))
        return [
            k for k in ra.keys() if ra.dtype(k) != rb.dtype(k) or not torch.equal(ra.get(k), rb.get(k))
        ]


def write_hf_weights(tensors: dict[str, torch.Tensor], folder: Path, sharded: bool) -> None:
    """Save ``tensors`` into an HF folder as one ``model.safetensors``, or as two shards with an
    index (the on-disk variants real checkpoints come in)."""
    import json

    from safetensors.torch import save_file

    names = sorted(tensors)
    parts = [names[: len(names) // 2], names[len(names) // 2:]] if sharded else [names]
    weight_map = {}
    for i, part in enumerate(parts):
        file = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors" if sharded else "model.safetensors"
        save_file({k: tensors[k].contiguous() for k in part}, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    if sharded:
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def image_batch(hf_dir: str):
    """Run on a rank: the fp32 Megatron model of ``hf_dir`` (eval), the default two-image batch and
    its model inputs: ``(built, batch, kwargs)``."""
    from vlm_bridge.loading import load_hf, load_processor
    from vlm_bridge.parallel import ParallelConfig, init_distributed
    from vlm_bridge.verify import DEFAULT_PROMPT, build_batch, default_media

    init_distributed(ParallelConfig())
    built = load_hf(hf_dir, ParallelConfig(), torch.float32)
    built.model.eval()
    images, _ = default_media()
    batch = build_batch(load_processor(hf_dir), images, None, DEFAULT_PROMPT)
    return built, batch, built.family.model_inputs(built.settings, dict(batch))


def hf_logits(hf_dir: str, batch) -> torch.Tensor:
    """The fp32 HF model's logits on ``batch``."""
    from vlm_bridge.verify import load_hf_reference

    with torch.no_grad():
        return load_hf_reference(hf_dir, torch.float32).eval()(**batch).logits


def saved_shapes(folder: str | Path) -> dict[str, list[int]]:
    """``{tensor name: shape}`` of every safetensors file in an HF folder, from the headers."""
    from safetensors import safe_open

    shapes: dict[str, list[int]] = {}
    for path in Path(folder).glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                shapes[key] = list(handle.get_slice(key).get_shape())
    return shapes
