"""The output layer and the cross-entropy loss together, a chunk of tokens at a time, so the
``[tokens, vocabulary]`` logits are never held whole: not in the forward pass, not for backward.

With a 262k vocabulary, 16k tokens of logits are 8.6 GB in bf16, 17 GB in the fp32 copy the loss
works in, and as much again for their gradient. Here each chunk's logits (about
:data:`CHUNK_BYTES` in fp32) are made, reduced to a per-token loss and a log-sum-exp, and dropped;
backward makes them again from the saved hidden states and turns them into the two gradients at
once. The price is one more output-layer GEMM per step (4 instead of 3).

Tensor parallelism works as Megatron's vocabulary-parallel loss does: each rank holds a vocabulary
shard, and the max, the sum of exponentials and the target logit are all-reduced over the TP group
per chunk. The hidden states enter through Megatron's ``copy_to_tensor_model_parallel_region``
(identity forward, all-reduce of the input gradient backward), as the output layer's would.
Padded vocabulary rows are -inf, as in :func:`vocab.mask_padded_vocab`.

On a GPU each chunk's loss and gradient come from the kernels of :mod:`.fused_cross_entropy`,
which read the chunk's half-precision logits in place of the fp32 copy and its passes here.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from vlm_bridge.families._common import fused_cross_entropy
from vlm_bridge.families._common.fused import fusion_enabled
from vlm_bridge.families._common.vocab import mask_padded_vocab

CHUNK_BYTES = 1 << 30
# Below this size of a micro-batch's fp32 logits the whole-logits loss is kept: its logits cost
# less than the chunked loss's extra GEMM and fp32 weight-gradient accumulator (measured on one
# H200: a 152k vocabulary at 4,096 tokens per row, 2.5 GB of logits, lost 6% of a 7B model's SFT
# speed chunked; a 262k one, 4.3 GB, let a 4B model's SFT run without recomputation only chunked).
CHUNK_ABOVE_BYTES = 3 << 30


def chunking_pays(tokens: int, local_vocab: int) -> bool:
    """Whether to chunk a loss over ``tokens`` x ``local_vocab`` logits: ``VLM_BRIDGE_CHUNKED_LOSS``
    ``1`` always, ``0`` never; otherwise when their fp32 size exceeds :data:`CHUNK_ABOVE_BYTES`."""
    forced = os.environ.get("VLM_BRIDGE_CHUNKED_LOSS")
    if forced in ("0", "1"):
        return forced == "1"
    return 4 * tokens * local_vocab > CHUNK_ABOVE_BYTES


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """fp32 logits of a chunk, padded vocabulary columns (global id >= vocab_size) at -inf."""
    return mask_padded_vocab((hidden @ weight.t()).float(), vocab_size, inplace=True)


def _targets(labels: torch.Tensor, first_col: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each label's column in this rank's shard (clamped) and whether the shard holds it."""
    local = labels - first_col
    inside = (local >= 0) & (local < cols)
    return local.clamp(0, cols - 1), inside


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                chunk: int, kernels: bool) -> torch.Tensor:
        rank, group = fused_cross_entropy.tp_rank_and_group()
        first_col, cols = rank * weight.shape[0], weight.shape[0]
        tokens = hidden.shape[0]
        loss = torch.empty(tokens, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(tokens, dtype=torch.float32, device=hidden.device)
        ctx.vocab_size, ctx.chunk, ctx.kernels = vocab_size, chunk, kernels
        for start in range(0, tokens, chunk):
            stop = min(start + chunk, tokens)
            if kernels:
                loss[start:stop], lse[start:stop] = fused_cross_entropy.loss_and_log_normaliser(
                    hidden[start:stop] @ weight.t(), labels[start:stop], vocab_size)
                continue
            logits = _chunk_logits(hidden[start:stop], weight, vocab_size)
            top = logits.max(dim=1).values
            if group is not None:
                dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
            logits.sub_(top[:, None])
            column, inside = _targets(labels[start:stop], first_col, cols)
            # where(), not a product: a clamped column may be a padded one, and -inf * 0 is nan
            target = torch.where(inside, logits.gather(1, column[:, None]).squeeze(1), 0.0)
            total = logits.exp_().sum(dim=1)
            if group is not None:
                dist.all_reduce(total, group=group)
                dist.all_reduce(target, group=group)
            log_total = total.log()
            loss[start:stop] = log_total - target
            lse[start:stop] = log_total + top
            del logits
        ctx.save_for_backward(hidden, weight, labels, lse)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        hidden, weight, labels, lse = ctx.saved_tensors
        rank, _ = fused_cross_entropy.tp_rank_and_group()
        first_col, cols = rank * weight.shape[0], weight.shape[0]
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = None
        rows = torch.arange(min(ctx.chunk, hidden.shape[0]), device=hidden.device)
        for start in range(0, hidden.shape[0], ctx.chunk):
            stop = min(start + ctx.chunk, hidden.shape[0])
            part = hidden[start:stop]
            if ctx.kernels:
                logits = part @ weight.t()  # its gradient takes its place
                span = slice(start, stop)
                grad_logits = fused_cross_entropy.logits_gradient(
                    logits, labels[span], lse[span], grad_loss[span], ctx.vocab_size, logits)
            else:
                # softmax - one_hot(target), scaled by each token's incoming gradient
                probs = _chunk_logits(part, weight, ctx.vocab_size).sub_(lse[start:stop, None]).exp_()
                column, inside = _targets(labels[start:stop], first_col, cols)
                probs[rows[:stop - start], column] -= inside.to(probs.dtype)
                grad_logits = probs.mul_(grad_loss[start:stop, None].float()).to(hidden.dtype)
                del probs
            if want_hidden:
                grad_hidden[start:stop] = grad_logits @ weight
            if want_weight:
                piece = grad_logits.t() @ part
                grad_weight = piece.float() if grad_weight is None else grad_weight.add_(piece)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                 vocab_size: int, chunk_bytes: int = CHUNK_BYTES) -> torch.Tensor:
    """Per-token loss ``[...]`` of ``labels`` (global vocabulary ids, shaped like ``hidden``'s
    leading dims) under the logits ``hidden @ weight.T`` over this TP rank's vocabulary shard
    ``weight`` ``[vocab / tp, h]``; ids from ``vocab_size`` up are padding, never predicted."""
    from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

    lead = hidden.shape[:-1]
    flat = copy_to_tensor_model_parallel_region(hidden).reshape(-1, hidden.shape[-1])
    chunk = max(1, chunk_bytes // (4 * weight.shape[0]))
    kernels = fusion_enabled(flat) and fused_cross_entropy.available(flat)
    loss = _ChunkedLinearCrossEntropy.apply(flat, weight, labels.reshape(-1).contiguous(), vocab_size, chunk,
                                            kernels)
    return loss.view(lead)
