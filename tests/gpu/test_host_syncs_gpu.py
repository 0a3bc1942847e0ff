"""A training micro-batch's forward and backward never make the host wait for the GPU: a waiting
host stops queueing kernels and the GPU idles until it catches up (index work reads the host
originals of the moved inputs; vision features go in by index, whose backward needs no count)."""

from __future__ import annotations

import pytest
import torch

from vlm_bridge.parallel import run_parallel

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _syncs_in_forward_backward(hf_dir: str, jsonl: str) -> list[str]:
    from vlm_bridge.data.encode import SampleEncoder
    from vlm_bridge.data.sources import load_source
    from vlm_bridge.inference.requests import ensure_pad_token
    from vlm_bridge.loading import load_hf, load_processor
    from vlm_bridge.parallel import ParallelConfig, device, init_distributed
    from vlm_bridge.testing.host_waits import host_waits
    from vlm_bridge.train.batching import collate_packed

    init_distributed(ParallelConfig())
    built = load_hf(hf_dir, ParallelConfig(), torch.bfloat16)
    model = built.model.train()
    processor = load_processor(hf_dir)
    ensure_pad_token(processor.tokenizer)
    encoder = SampleEncoder(processor, 256)
    samples = [encoder.encode(s) for s in list(load_source(f"jsonl:{jsonl}"))[:4]]
    batch = collate_packed([samples[:2], samples[2:]], built.family, built.settings, 256,
                           processor.tokenizer.pad_token_id)

    def step():
        mb = batch.to(device())
        per_token = model(**mb.inputs, labels=mb.labels)
        (per_token * mb.loss_mask).sum().backward()

    step()  # first use: kernels compile and check themselves once
    return list(host_waits(step))


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "gemma3_vl", "nemotron_vl"])
def test_a_training_micro_batch_never_waits_for_the_gpu(family, tmp_path):
    from vlm_bridge.registry import family_by_name
    from vlm_bridge.testing.shapes_task import make_task

    spec = family_by_name(family)
    hf = spec.build_tiny(tmp_path / "hf", **spec.tiny_variants["default"])
    jsonl = make_task(tmp_path / "shapes", n_train=8, n_eval=2, size=56)["train"]
    sites = run_parallel(_syncs_in_forward_backward, 1, str(hf), str(jsonl))
    assert sites == [], sites
