"""The Mamba-2 building blocks on their own: the packed causal conv (one conv call plus a fix-up of
the positions right after each run start) equals every run convolved alone, however short the
runs; the recomputing scan returns the plain scan's values and gradients while keeping only its
inputs for the backward."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlm_bridge.families._common.ssd_scan import (
    causal_conv1d,
    conv_fixups,
    recomputed_ssd_scan,
    segment_runs,
    ssd_scan,
)

RUN_LENGTHS = (1, 2, 5, 3, 1, 9, 2)  # runs shorter than the kernel, and back-to-back short runs


def _segments(lengths: tuple[int, ...]) -> torch.Tensor:
    ids = [torch.full((n,), i if i % 3 else -1) for i, n in enumerate(lengths)]  # every third: padding
    return torch.cat(ids)[None]


def test_packed_conv_equals_each_run_alone():
    gen = torch.Generator().manual_seed(0)
    channels, k = 6, 4
    seq = sum(RUN_LENGTHS)
    x = torch.randn(1, channels, seq, generator=gen, requires_grad=True)
    weight = torch.randn(channels, 1, k, generator=gen, requires_grad=True)
    bias = torch.randn(channels, generator=gen, requires_grad=True)
    runs = segment_runs(_segments(RUN_LENGTHS))
    probe = torch.randn(1, channels, seq, generator=gen)

    out = causal_conv1d(x, weight, bias, runs)
    grads = torch.autograd.grad((out * probe).sum(), (x, weight, bias))

    alone, start = [], 0
    for n in RUN_LENGTHS:
        alone.append(F.conv1d(x[..., start:start + n], weight, bias, padding=k - 1, groups=channels)[..., :n])
        start += n
    expected = torch.cat(alone, dim=-1)
    expected_grads = torch.autograd.grad((expected * probe).sum(), (x, weight, bias))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    # Positions derived once per micro-batch and handed to every layer give the same values.
    assert torch.equal(causal_conv1d(x, weight, bias, runs, conv_fixups(runs, k)), out)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # One run per row is the plain conv.
    torch.testing.assert_close(causal_conv1d(x, weight, bias, torch.zeros(1, seq, dtype=torch.long)),
                               causal_conv1d(x, weight, bias), rtol=0, atol=0)


def _scan_inputs(gen: torch.Generator, seq: int = 37, heads: int = 4, groups: int = 2):
    x = torch.randn(2, seq, heads, 3, generator=gen)
    dt = torch.rand(2, seq, heads, generator=gen) * 0.5
    A = -torch.rand(heads, generator=gen) - 0.2
    B = torch.randn(2, seq, groups, 5, generator=gen)
    C = torch.randn(2, seq, groups, 5, generator=gen)
    return [t.requires_grad_() for t in (x, dt, A, B, C)]


def test_recomputed_scan_matches_and_keeps_only_its_inputs():
    gen = torch.Generator().manual_seed(1)
    inputs = _scan_inputs(gen)
    segment_ids = torch.tensor([[0] * 20 + [1] * 17, [0] * 30 + [-1] * 7])
    runs = segment_runs(segment_ids)
    probe = torch.randn(2, 37, 4, 3, generator=gen)

    plain, _ = ssd_scan(*inputs, chunk_size=8, runs=runs)
    plain_grads = torch.autograd.grad((plain * probe).sum(), inputs)

    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        recomputed = recomputed_ssd_scan(*inputs, chunk_size=8, runs=runs)
    grads = torch.autograd.grad((recomputed * probe).sum(), inputs)

    assert torch.equal(recomputed, plain)
    for got, want in zip(grads, plain_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert sum(t.numel() for t in saved) == sum(t.numel() for t in inputs)

    # Frozen inputs get no gradient and cost no backward for them.
    frozen = [t.detach() if i in (2, 3) else t for i, t in enumerate(inputs)]
    out = recomputed_ssd_scan(*frozen, chunk_size=8, runs=runs)
    partial = torch.autograd.grad((out * probe).sum(), [frozen[i] for i in (0, 1, 4)])
    for got, i in zip(partial, (0, 1, 4)):
        torch.testing.assert_close(got, plain_grads[i], rtol=0, atol=1e-6)
