"""The vocabulary-parallel cross-entropy of the whole-logits loss in two Triton kernels that read
the half-precision logits where the output layer wrote them.

Megatron's ``vocab_parallel_cross_entropy`` works on an fp32 copy of the logits (2.5 GB for 4,096
tokens of a 152k vocabulary), makes about eight passes over it (max, shift, exp, sum, divide in the
forward; the one-hot update and the scaling in the backward) and keeps the fp32 softmax for the
backward. Here the forward reads each row once, keeping a running maximum, the sum of exponentials
and the target's logit in fp32 registers; the backward reads the row again and writes
``(softmax - one_hot) * dloss`` over the logits themselves, which nothing needs after the loss.
Nothing of the logits' size is allocated.

The result is Megatron's, term for term: the same fp32 arithmetic (a different summation order),
padded vocabulary columns (global id >= ``vocab_size``) left out as ``-inf`` logits are, a label in
no rank's shard contributing no target logit, and under tensor parallelism the maximum, the sum and
the target all-reduced over the TP group. The gradient is rounded to the logits' dtype once, where
the fp32 path rounds it when the ``.float()`` copy hands it back.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.distributed as dist

from vlm_bridge.families._common.fused_triton import passes_self_check, triton_runs_on

_BLOCK = 4096


def available(logits: torch.Tensor) -> bool:
    """True where the kernels can run and are wanted: a CUDA tensor (any under
    ``TRITON_INTERPRET=1``), Triton, and ``VLM_BRIDGE_FUSED_LOSS`` not ``0`` (which keeps Megatron's
    fp32 loss)."""
    return (os.environ.get("VLM_BRIDGE_FUSED_LOSS", "1") != "0" and triton_runs_on(logits)
            and passes_self_check("cross-entropy", logits.device, _self_check))


def _self_check(device: torch.device) -> None:
    """Both kernels on a small shard (padded columns, several blocks, bf16 and fp32) against the
    torch computation; no collectives, so each rank checks alone."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        logits = (torch.randn(3, 300, generator=gen) * 3).to(device=device, dtype=dtype)
        labels = torch.tensor([0, 150, 289], device=device)
        stats = torch.empty(3, 3, dtype=torch.float32, device=device)
        row_statistics, gradient = _kernels()
        row_statistics[(3,)](logits, labels, stats[0], stats[1], stats[2], 300, 290, 0, BLOCK=128)
        real = logits[:, :290].float()
        lse = real.logsumexp(-1)
        torch.testing.assert_close(stats[0] + stats[1].log(), lse, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(stats[2], real.gather(1, labels[:, None])[:, 0], rtol=1e-4, atol=1e-4)
        grad = torch.empty_like(logits)
        dloss = torch.ones(3, device=device)
        gradient[(3,)](logits, labels, lse, dloss, grad, 300, 290, 0, BLOCK=128)
        want = torch.nn.functional.pad(real.softmax(-1), (0, 10))
        want[torch.arange(3), labels] -= 1
        torch.testing.assert_close(grad.float(), want, rtol=1e-2, atol=1e-2)


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def row_statistics(LOGITS, LABELS, MAX, SUMEXP, TARGET, cols, valid_cols, first_col,
                       BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = LOGITS + row * cols
        label = tl.load(LABELS + row) - first_col
        offs = tl.arange(0, BLOCK)
        # A finite start: a shard that is all padding keeps sum 0 instead of exp(-inf + inf).
        running_max = tl.full([], -1.0e30, tl.float32)
        running_sum = tl.zeros([], tl.float32)
        target = tl.zeros([], tl.float32)
        for start in range(0, cols, BLOCK):
            col = start + offs
            x = tl.load(base + col, mask=col < valid_cols, other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(running_max, tl.max(x, axis=0))
            running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
            running_max = new_max
            target += tl.sum(tl.where(col == label, x, 0.0), axis=0)
        tl.store(MAX + row, running_max)
        tl.store(SUMEXP + row, running_sum)
        tl.store(TARGET + row, target)

    @triton.jit
    def gradient_kernel(LOGITS, LABELS, LSE, DLOSS, GRAD, cols, valid_cols, first_col,
                        BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        label = tl.load(LABELS + row) - first_col
        lse = tl.load(LSE + row)
        dloss = tl.load(DLOSS + row).to(tl.float32)
        offs = tl.arange(0, BLOCK)
        for start in range(0, cols, BLOCK):
            col = start + offs
            x = tl.load(LOGITS + row * cols + col, mask=col < valid_cols, other=float("-inf")).to(tl.float32)
            grad = (tl.exp(x - lse) - tl.where(col == label, 1.0, 0.0)) * dloss
            tl.store(GRAD + row * cols + col, grad.to(GRAD.dtype.element_ty), mask=col < cols)

    return row_statistics, gradient_kernel


def tp_rank_and_group() -> tuple[int, object | None]:
    """This rank's TP rank and the TP group (None without TP or outside Megatron)."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return 0, None
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return 0, None
    return parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_group()


def shard_columns(cols: int, vocab_size: int) -> tuple[int, int]:
    """This TP rank's first global vocabulary column and how many of its ``cols`` are real."""
    rank, _ = tp_rank_and_group()
    first_col = rank * cols
    return first_col, max(0, min(cols, vocab_size - first_col))


def loss_and_log_normaliser(logits: torch.Tensor, labels: torch.Tensor,
                            vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss and log-sum-exp (fp32, ``[rows]``) of ``logits`` ``[rows, local_vocab]``
    (contiguous rows of this rank's shard) for global ``labels`` ``[rows]``, reduced over TP."""
    row_statistics, _ = _kernels()
    rows, cols = logits.shape
    first_col, valid_cols = shard_columns(cols, vocab_size)
    _, group = tp_rank_and_group()
    stats = torch.empty(3, rows, dtype=torch.float32, device=logits.device)
    row_statistics[(rows,)](logits, labels, stats[0], stats[1], stats[2], cols, valid_cols, first_col,
                            BLOCK=_BLOCK, num_warps=8)
    local_max, local_sum, target = stats
    inside = (labels >= first_col) & (labels < first_col + valid_cols)
    global_max = local_max.clone()
    if group is not None:
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
    # The shifted target logit (Megatron's "predicted logit"): 0 where this shard lacks the label.
    shifted = torch.stack([local_sum * torch.exp(local_max - global_max),
                           torch.where(inside, target - global_max, 0.0)])
    if group is not None:
        dist.all_reduce(shifted, group=group)
    sum_exp, predicted = shifted
    log_sum = torch.log(sum_exp)
    return log_sum - predicted, global_max + log_sum


def logits_gradient(logits: torch.Tensor, labels: torch.Tensor, log_normaliser: torch.Tensor,
                    dloss: torch.Tensor, vocab_size: int, out: torch.Tensor) -> torch.Tensor:
    """``(softmax - one_hot(label)) * dloss`` of ``logits`` ``[rows, local_vocab]`` into ``out``
    (which may be ``logits`` itself), rounded to ``out``'s dtype."""
    _, gradient = _kernels()
    rows, cols = logits.shape
    first_col, valid_cols = shard_columns(cols, vocab_size)
    gradient[(rows,)](logits, labels, log_normaliser, dloss.contiguous(), out, cols, valid_cols, first_col,
                      BLOCK=_BLOCK, num_warps=8)
    return out


class _FusedVocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, vocab_size: int, grad_in_place: bool):
        flat = logits.reshape(-1, logits.shape[-1])
        flat_labels = labels.reshape(-1).contiguous()
        loss, log_normaliser = loss_and_log_normaliser(flat, flat_labels, vocab_size)
        ctx.save_for_backward(flat, flat_labels, log_normaliser)
        ctx.vocab_size, ctx.grad_in_place, ctx.shape = vocab_size, grad_in_place, logits.shape
        return loss.view(labels.shape)

    @staticmethod
    def backward(ctx, dloss: torch.Tensor):
        flat, flat_labels, log_normaliser = ctx.saved_tensors
        out = flat if ctx.grad_in_place else torch.empty_like(flat)
        grad = logits_gradient(flat, flat_labels, log_normaliser, dloss.reshape(-1), ctx.vocab_size, out)
        return grad.view(ctx.shape), None, None, None


def fused_vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                                       grad_in_place: bool = False) -> torch.Tensor:
    """Per-token loss ``[*labels.shape]`` of ``logits`` ``[*labels.shape, local_vocab]`` (this TP
    rank's shard, rows contiguous), as Megatron's ``vocab_parallel_cross_entropy`` of the fp32
    logits with columns past ``vocab_size`` masked. ``grad_in_place`` writes the gradient over
    ``logits``: only for logits made for this loss alone."""
    if logits.stride(-1) != 1 or not logits.is_contiguous():
        logits = logits.contiguous()
    return _FusedVocabParallelCrossEntropy.apply(logits, labels, int(vocab_size), bool(grad_in_place))
