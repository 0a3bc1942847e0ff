"""Run with TRITON_INTERPRET=1 (by test_fused_elementwise.py): each hand-written Triton kernel of
``fused_triton`` against the eager body of ``fused``, values and gradients. In fp32 they agree to
rounding. In bf16 they agree within a few bf16 steps only: the interpreter truncates fp32 to bf16
where a GPU rounds to nearest, so the bf16 error comparison against fp32 runs on the GPU
(``tests/gpu/test_fused_gpu.py``). Prints one "ok" line per case and exits non-zero on the first
mismatch."""

from __future__ import annotations

import os
import tempfile

import torch

from vlm_bridge.families._common import fused, fused_triton


def values_and_grads(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    out.backward(upstream.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


def max_error(values: list, reference: list) -> list[float]:
    return [float((v.float() - r.float()).abs().max()) for v, r in zip(values, reference, strict=True)]


def main() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1" and fused_triton.available(torch.zeros(1))
    for dtype in (torch.float32, torch.bfloat16):
        gen = torch.Generator().manual_seed(4)
        x, residual = (t.to(dtype) for t in torch.randn(2, 5, 3, 40, generator=gen))  # width not 2^k
        w = (torch.randn(40, generator=gen) * 0.1).to(dtype)
        heads = torch.randn(6, 2, 16, generator=gen).to(dtype)[:, :, :8]  # rows not contiguous
        glu_in = torch.randn(5, 3, 2 * 24, generator=gen).to(dtype)
        # wider than a row kernel takes (16,384), not a multiple of the column block
        wide_glu_in = torch.randn(2, 1, 2 * 8200, generator=gen).to(dtype)
        cases = {
            "norm+residual": (lambda a, b, c: fused_triton.rms_norm(a, b, 1.0, 1e-6, c),
                              lambda a, b, c: fused._rms_norm_add(a, b, c, 1.0, 1e-6), (x, w, residual)),
            "head norm": (lambda a, b: fused_triton.rms_norm(a, b, 0.0, 1e-5),
                          lambda a, b: fused._rms_norm(a, b, 0.0, 1e-5), (heads, w[:8])),
            "gelu-tanh gate": (fused_triton.gelu_tanh_glu, fused._gelu_tanh_glu, (glu_in,)),
            "wide gelu-tanh gate": (fused_triton.gelu_tanh_glu, fused._gelu_tanh_glu, (wide_glu_in,)),
        }
        for name, (triton_fn, eager_fn, tensors) in cases.items():
            got, want = values_and_grads(triton_fn, *tensors), values_and_grads(eager_fn, *tensors)
            for g, e in zip(got, want, strict=True):
                assert g.dtype == e.dtype and g.shape == e.shape, (name, g.dtype, e.dtype)
            # bf16: four steps of 2^-8 relative (truncation and rounding differ by up to one per op).
            tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2**-6, "atol": 2**-6}
            for g, e in zip(got, want, strict=True):
                torch.testing.assert_close(g, e, **tol, msg=lambda m, n=name: f"{n}: {m}")
            print(f"ok {name} {dtype} max diff {max(max_error(got, want)):.2e}")
    check_adam_kernel()
    for line in check_rope():
        print(line)
    from vlm_bridge.parallel import run_parallel

    for tp in (1, 2):
        for line in run_parallel(check_cross_entropy, tp, tp):
            print(line)
    with tempfile.TemporaryDirectory() as tmp:
        print(run_parallel(check_model_loss, 1, tmp))


def check_rope() -> list[str]:
    """The fused RoPE against Megatron's torch RoPE: a query view out of a fused QKV tensor (rows
    not contiguous), 5 heads (a partial head block), angles per batch row whose halves differ
    (3-D MRoPE), and a rotary narrower than the head (the rest passes through); values and the
    input gradient."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    from vlm_bridge.families._common import fused_rope

    gen = torch.Generator().manual_seed(8)
    lines = []
    default_tokens = fused_rope.TOKENS_PER_PROGRAM
    # one (token, row) pair per program, and 8 of the 12 pairs (a partial last block)
    for dtype, rot, per_row, tokens in ((torch.float32, 24, True, 1), (torch.float32, 16, False, 8),
                                        (torch.bfloat16, 24, True, 8), (torch.bfloat16, 16, False, 1),
                                        (torch.float32, 24, False, default_tokens)):
        fused_rope.TOKENS_PER_PROGRAM = tokens
        qkv = (torch.randn(6, 2, 7, 24, generator=gen) * 2).to(dtype)
        query = qkv[:, :, :5]  # [s, b, 5 heads, 24]: a view, strides of 7 heads
        freqs = torch.randn(6, 2 if per_row else 1, 1, rot, generator=gen) * 3
        assert fused_rope.covers(query, freqs)
        got = values_and_grads(lambda t, f=freqs: fused_rope.fused_apply_rotary_pos_emb(t, f), query)
        want = values_and_grads(lambda t, f=freqs: _apply_rotary_pos_emb_bshd(t.float(), f).to(t.dtype),
                                query)
        tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2**-7, "atol": 2**-6}
        for g, e in zip(got, want, strict=True):
            assert g.dtype == e.dtype and g.shape == e.shape
            torch.testing.assert_close(g, e, **tol)
        lines.append(f"ok rope {dtype} rot={rot} per_row={per_row} tokens/program={tokens} max diff "
                     f"{max(max_error(got, want)):.2e}")
    fused_rope.TOKENS_PER_PROGRAM = default_tokens
    return lines


# 300 real columns padded to 384; at TP=2 the second shard (192-383) holds 108 real columns, so the
# kernels loop over a shard wider than one block (block 128 below) and skip its padding.
CE_VOCAB, CE_PADDED, CE_BLOCK = 300, 384, 128


def check_cross_entropy(tp: int) -> list[str]:
    """The fused vocabulary-parallel cross-entropy against Megatron's own on the fp32 copy of the
    logits (padded columns masked), loss and logits gradient, on this rank's vocabulary shard.
    Labels include one on the other shard and Megatron's ignored -100."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from vlm_bridge.families._common import fused_cross_entropy
    from vlm_bridge.families._common.vocab import mask_padded_vocab
    from vlm_bridge.parallel import ParallelConfig, init_distributed

    init_distributed(ParallelConfig(tp=tp))
    fused_cross_entropy._BLOCK = CE_BLOCK
    rank = parallel_state.get_tensor_model_parallel_rank()
    gen = torch.Generator().manual_seed(6)
    full = torch.randn(5, 2, CE_PADDED, generator=gen) * 4
    full[..., CE_VOCAB:] = 0.0  # padded rows of the output weight are zero
    labels = torch.randint(0, CE_VOCAB, (5, 2), generator=gen)
    labels[0, 0], labels[1, 1], labels[2, 0] = -100, CE_VOCAB - 1, 0
    upstream = torch.rand(5, 2, generator=gen)
    lines, grads = [], {}
    for dtype in (torch.float32, torch.bfloat16):
        shard = full.to(dtype).chunk(tp, dim=-1)[rank].contiguous()
        want_in = shard.clone().requires_grad_()
        want = vocab_parallel_cross_entropy(mask_padded_vocab(want_in.float(), CE_VOCAB), labels)
        want.backward(upstream)
        got_in = shard.clone().requires_grad_()
        got = fused_cross_entropy.fused_vocab_parallel_cross_entropy(got_in, labels, CE_VOCAB)
        got.backward(upstream)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        # bf16 gradients: one rounding on both sides, but the interpreter truncates where torch rounds
        tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2**-7, "atol": 1e-6}
        torch.testing.assert_close(got_in.grad, want_in.grad, **tol)
        assert got_in.grad.dtype == dtype
        lines.append(f"ok cross-entropy tp={tp} {dtype} max diff {float((got - want).abs().max()):.2e}")
        grads[dtype] = want_in.grad
    # grad_in_place: the gradient is written over the logits (a non-leaf, as the output layer's are)
    leaf = full.chunk(tp, dim=-1)[rank].contiguous().requires_grad_()
    logits = leaf * 1.0
    fused = fused_cross_entropy.fused_vocab_parallel_cross_entropy
    loss = fused(logits, labels, CE_VOCAB, grad_in_place=True)
    loss.backward(upstream)
    torch.testing.assert_close(leaf.grad, grads[torch.float32], rtol=1e-5, atol=1e-6)
    assert torch.equal(logits.detach(), leaf.grad)
    lines.append(f"ok cross-entropy tp={tp} gradient in place")
    lines.append(check_chunked_loss(tp, rank))
    return lines if rank == 0 else []


def check_chunked_loss(tp: int, rank: int) -> str:
    """The chunked output layer + loss with its chunks run by the kernels, against its fp32 torch
    chunks: loss and both gradients, chunks that do not divide the tokens, on this rank's shard."""
    from vlm_bridge.families._common import chunked_loss

    gen = torch.Generator().manual_seed(7)
    hidden = torch.randn(7, 2, 16, generator=gen)
    weight = torch.randn(CE_PADDED, 16, generator=gen)
    weight[CE_VOCAB:] = 0
    shard = weight.chunk(tp)[rank]
    labels = torch.randint(0, CE_VOCAB, (7, 2), generator=gen)
    upstream = torch.rand(7, 2, generator=gen)
    results = []
    for kernels in (False, True):
        chunked_loss.fusion_enabled = lambda x, on=kernels: on
        h, w = hidden.clone().requires_grad_(), shard.clone().requires_grad_()
        five_tokens = 5 * 4 * w.shape[0]
        loss = chunked_loss.chunked_linear_cross_entropy(h, w, labels, CE_VOCAB, chunk_bytes=five_tokens)
        loss.backward(upstream)
        results.append((loss.detach(), h.grad, w.grad))
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    diff = float((results[1][0] - results[0][0]).abs().max())
    return f"ok chunked loss by the kernels tp={tp} max diff {diff:.2e}"


def check_model_loss(tmp: str) -> str:
    """Through a model (Qwen2.5-VL's tiny vocabulary is padded for TP): the fused loss where the
    model takes it (``fusion_enabled``, true on a GPU) against the fp32 one, per-token loss and the
    output layer's gradient."""
    from vlm_bridge.families._common import vlm
    from vlm_bridge.loading import load_hf, load_processor
    from vlm_bridge.parallel import ParallelConfig, init_distributed
    from vlm_bridge.testing.tiny_qwen2_5_vl import build_tiny_qwen2_5_vl
    from vlm_bridge.verify import DEFAULT_PROMPT, build_batch, default_media

    init_distributed(ParallelConfig())
    hf_dir = build_tiny_qwen2_5_vl(f"{tmp}/hf")
    built = load_hf(str(hf_dir), ParallelConfig(), torch.float32)
    batch = build_batch(load_processor(str(hf_dir)), *default_media(), DEFAULT_PROMPT)
    inputs = built.family.model_inputs(built.settings, dict(batch))
    calls, kernel_loss = [], vlm.fused_vocab_parallel_cross_entropy
    vlm.fused_vocab_parallel_cross_entropy = lambda *a, **k: calls.append(k) or kernel_loss(*a, **k)
    results = []
    for fused_loss in (False, True):
        vlm.fusion_enabled = lambda x, on=fused_loss: on
        built.model.zero_grad(set_to_none=True)
        loss = built.model(**inputs, labels=batch["input_ids"])
        loss.sum().backward()
        output = next(p.grad for n, p in built.model.named_parameters() if "output_layer" in n)
        results.append((loss.detach().clone(), output.clone()))
    (loss, grad), (fused_loss, fused_grad) = results
    assert calls == [{"grad_in_place": True}], calls  # the second pass, and only it, took the kernel
    torch.testing.assert_close(fused_loss, loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fused_grad, grad, rtol=1e-5, atol=1e-6)
    return f"ok cross-entropy through the model max diff {float((fused_loss - loss).abs().max()):.2e}"


def check_adam_kernel() -> None:
    """The fused AdamW update (bf16 moments) from a bf16 gradient it widens and clips itself,
    against the sliced torch update, which widens and clips the same way."""
    from vlm_bridge.train import adam_triton
    from vlm_bridge.train.low_memory_adam import AdamWBf16Moments

    kernel, cdiv = adam_triton._kernel()
    gen = torch.Generator().manual_seed(5)
    n = adam_triton.BLOCK + 7  # a partial last block
    start = torch.randn(n, generator=gen)
    grads = [torch.randn(n, generator=gen).to(torch.bfloat16) for _ in range(3)]
    # a different clipping coefficient each step: Adam is blind to one constant scale of all steps
    scales = (0.25, 1.0, 0.05)
    results = []
    for fused_path, step_scales in ((True, scales), (False, scales), (False, (1.0, 1.0, 1.0))):
        param = start.clone()
        m, v = torch.zeros(n, dtype=torch.bfloat16), torch.zeros(n, dtype=torch.bfloat16)
        for step, (grad, scale) in enumerate(zip(grads, step_scales, strict=True), start=1):
            c1, rc2, lr, wd, eps, b1, b2 = 1 - 0.9**step, (1 - 0.95**step) ** 0.5, 1e-3, 0.1, 1e-8, 0.9, 0.95
            if fused_path:
                kernel[(cdiv(n, adam_triton.BLOCK),)](param, grad, scale, m, v, n, 1 - lr * wd, b1, 1 - b1,
                                                      b2, 1 - b2, eps, lr / c1, 1 / rc2,
                                                      BLOCK=adam_triton.BLOCK)
            else:
                AdamWBf16Moments._update(param, grad, scale, {"exp_avg": m, "exp_avg_sq": v}, lr, wd, eps, b1,
                                         b2, c1, rc2)
        results.append((param, v))
    (p_fused, v_fused), (p_torch, v_torch), (p_unclipped, _) = results
    # the interpreter truncates the moments to bf16 where torch rounds: a moment may sit one bf16
    # step (2^-8 relative) lower, and each of the 3 updates (lr 1e-3) may differ by that fraction
    diff = (p_fused - p_torch).abs().max()
    assert diff < 3e-5, diff
    assert (p_unclipped - p_torch).abs().max() > 10 * 3e-5  # the coefficients matter here
    # and a moment may be up to one bf16 step (2^-7 relative) lower per step
    torch.testing.assert_close(v_fused.float(), v_torch.float(), rtol=3 * 2**-7, atol=0)
    print(f"ok adam bf16 grad clipped max diff {diff:.2e}")

if __name__ == "__main__":
    main()
