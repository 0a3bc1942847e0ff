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
