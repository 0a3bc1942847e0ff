"""The chunked output layer + cross-entropy equals the whole-logits loss (padded vocabulary rows
masked), in value and in both gradients, at TP=1 and across a TP=2 vocabulary split on gloo, with
chunks that do not divide the tokens."""

from __future__ import annotations

import pytest
import torch

from vlm_bridge.parallel import ParallelConfig, run_parallel

# At TP=2 the second shard (rows 24-47) is padding only, as a tiny vocabulary padded to 128 is.
HIDDEN, VOCAB, PADDED, SEQ, BATCH = 16, 21, 48, 7, 2


def _inputs():
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(SEQ, BATCH, HIDDEN, generator=g)
    weight = torch.randn(PADDED, HIDDEN, generator=g) * 0.5
    weight[VOCAB:] = 0  # padded rows are zero in the model too
    labels = torch.randint(0, VOCAB, (SEQ, BATCH), generator=g)
    grad = torch.rand(SEQ, BATCH, generator=g)
    return hidden, weight, labels, grad


def _reference():
    hidden, weight, labels, grad = _inputs()
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    logits = hidden @ weight.t()
    logits = logits.masked_fill(torch.arange(PADDED) >= VOCAB, float("-inf"))
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, PADDED), labels.reshape(-1), reduction="none")
    loss = loss.view(SEQ, BATCH)
    loss.backward(grad)
    return loss.detach(), hidden.grad, weight.grad


def _chunked(tp: int, out: str) -> None:
    from megatron.core import parallel_state

    from vlm_bridge.families._common.chunked_loss import chunked_linear_cross_entropy
    from vlm_bridge.parallel import init_distributed

    init_distributed(ParallelConfig(tp=tp))
    rank = parallel_state.get_tensor_model_parallel_rank()
    hidden, weight, labels, grad = _inputs()
    shard = weight.chunk(tp)[rank].clone().requires_grad_(True)
    hidden.requires_grad_(True)
    # 5 tokens per chunk: 14 tokens make chunks of 5, 5 and 4
    loss = chunked_linear_cross_entropy(hidden, shard, labels, VOCAB, chunk_bytes=5 * 4 * shard.shape[0])
    loss.backward(grad)
    torch.save({"loss": loss.detach(), "hidden": hidden.grad, "weight": shard.grad}, f"{out}/rank{rank}.pt")


@pytest.mark.parametrize("tp", [1, 2])
def test_chunked_loss_equals_whole_logits(tp, tmp_path):
    run_parallel(_chunked, tp, tp, str(tmp_path))
    loss, grad_hidden, grad_weight = _reference()
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(tp)]
    for rank, result in enumerate(got):
        torch.testing.assert_close(result["loss"], loss, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(result["hidden"], grad_hidden, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(result["weight"], grad_weight.chunk(tp)[rank], rtol=1e-5, atol=1e-6)
    first_padded = VOCAB - PADDED // tp * (tp - 1)  # in the last rank's shard
    assert torch.count_nonzero(got[-1]["weight"][first_padded:]) == 0  # padding learns nothing


def _model_loss_and_grads(hf_dir: str, out: str) -> None:
    import os

    from vlm_bridge.loading import load_hf, load_processor
    from vlm_bridge.parallel import init_distributed
    from vlm_bridge.verify import DEFAULT_PROMPT, build_batch, default_media

    init_distributed(ParallelConfig())
    built = load_hf(hf_dir, ParallelConfig(), torch.float32)
    batch = build_batch(load_processor(hf_dir), *default_media(), DEFAULT_PROMPT)
    inputs = built.family.model_inputs(built.settings, dict(batch))
    results = {}
    for forced in ("0", "1"):
        os.environ["VLM_BRIDGE_CHUNKED_LOSS"] = forced
        built.model.zero_grad(set_to_none=True)
        loss = built.model(**inputs, labels=batch["input_ids"])
        loss.sum().backward()
        grads = {n: p.grad.clone() for n, p in built.model.named_parameters() if "output_layer" in n or
                 "embedding" in n or "final_layernorm" in n}
        results[forced] = {"loss": loss.detach().clone(), "grads": grads}
    torch.save(results, f"{out}/model.pt")


@pytest.mark.slow
def test_model_loss_is_the_same_chunked_or_whole(tmp_path):
    """Through the model (tied output weight, padded vocabulary): forcing the chunked loss on
    changes neither the per-token loss nor the output layer's, embedding's or final norm's
    gradients."""
    from vlm_bridge.testing.tiny_gemma3_vl import build_tiny_gemma3_vl

    hf = build_tiny_gemma3_vl(tmp_path / "hf")
    run_parallel(_model_loss_and_grads, 1, str(hf), str(tmp_path))
    got = torch.load(tmp_path / "model.pt")
    whole, chunked = got["0"], got["1"]
    torch.testing.assert_close(chunked["loss"], whole["loss"], rtol=1e-6, atol=1e-6)
    assert whole["grads"] and whole["grads"].keys() == chunked["grads"].keys()
    for name, grad in whole["grads"].items():
        # fp32 rounding only: the two losses' softmax gradients differ in the last bits, which
        # backward through the decoder carries into the embedding rows
        worst = (chunked["grads"][name] - grad).abs().max() / grad.abs().max()
        assert worst < 1e-5, (name, float(worst))
