"""The fused norm and gated activation: their eager bodies match independent references (HF's
Gemma RMSNorm, erf-free GELU-tanh gating), and the graphs ``torch.compile`` captures from them
(forward and backward, whole-graph, shape-generic) compute the same values and gradients. The
Triton kernels those graphs become on a GPU are checked in ``tests/gpu/test_fused_gpu.py``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

from vlm_bridge.compat import dynamo
from vlm_bridge.families._common import fused


def _gemma_norm(hidden: int, weight: torch.Tensor, eps: float) -> Gemma3RMSNorm:
    norm = Gemma3RMSNorm(hidden, eps=eps)
    norm.weight.data.copy_(weight)
    return norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_rms_norm_matches_hf_gemma(dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 48, generator=gen).to(dtype)
    w = torch.randn(48, generator=gen) * 0.1
    ours = fused.fp32_rms_norm(x, w.to(dtype), 1.0, 1e-6)
    ref = _gemma_norm(48, w, 1e-6).to(dtype)(x)
    assert ours.dtype == dtype
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    residual = torch.randn(5, 3, 48, generator=gen).to(dtype)
    torch.testing.assert_close(fused.fp32_rms_norm(x, w.to(dtype), 1.0, 1e-6, residual), residual + ref,
                               rtol=0, atol=0)


def test_eager_glu_matches_composition():
    x = torch.randn(7, 2, 2 * 24, generator=torch.Generator().manual_seed(1))
    gate, up = x[..., :24], x[..., 24:]
    expected = 0.5 * gate * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (gate + 0.044715 * gate**3))) * up
    torch.testing.assert_close(fused.gelu_tanh_glu(x), expected, rtol=1e-6, atol=1e-6)


def _values_and_grads(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]
    out = fn(*leaves)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out.dtype)
    out.backward(upstream)
    return out.detach(), [t.grad for t in leaves if t.requires_grad]


@pytest.fixture
def traced(monkeypatch):
    """Route every call through ``torch.compile`` (aot_eager: the captured forward and backward
    graphs, run by torch) as on a GPU."""
    counter = CompileCounterWithBackend("aot_eager")
    monkeypatch.setattr(fused, "COMPILE_BACKEND", counter)
    monkeypatch.setattr(fused, "fusion_enabled", lambda x: True)
    fused._compiled.cache_clear()
    yield counter
    fused._compiled.cache_clear()


def test_captured_graphs_match_eager(traced):
    gen = torch.Generator().manual_seed(3)
    x, residual = torch.randn(2, 9, 2, 32, generator=gen)
    w = torch.randn(32, generator=gen)
    for rows in (9, 5):  # a second length: the shape-generic graph serves it
        xs, rs = x[:rows], residual[:rows]
        got = _values_and_grads(lambda a, b, c: fused.fp32_rms_norm(a, b, 1.0, 1e-6, c), xs, w, rs)
        want = _values_and_grads(lambda a, b, c: fused._rms_norm_add(a, b, c, 1.0, 1e-6), xs, w, rs)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        got = _values_and_grads(lambda a, b: fused.fp32_rms_norm(a, b, 0.0, 1e-5), xs, w)
        want = _values_and_grads(lambda a, b: fused._rms_norm(a, b, 0.0, 1e-5), xs, w)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    glu_in = torch.randn(9, 2, 64, generator=gen)
    got = _values_and_grads(fused.gelu_tanh_glu, glu_in)
    want = _values_and_grads(lambda a: F.gelu(a[..., :32], approximate="tanh") * a[..., 32:], glu_in)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # One whole graph per function (norm + add, norm, gate), none recaptured for the new length.
    assert traced.frame_count == 3


def test_fusion_is_off_on_cpu_when_disabled_and_during_generation(monkeypatch):
    cuda_like = torch.empty(0, device="meta")
    assert not fused.fusion_enabled(torch.zeros(1))
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert fused.fusion_enabled(cuda_like)
    with fused.eager_fusions():
        assert not fused.fusion_enabled(cuda_like)
    monkeypatch.setenv("VLM_BRIDGE_FUSED", "0")
    assert not fused.fusion_enabled(cuda_like)


def test_triton_kernels_match_eager():
    """The hand-written Triton kernels, run by Triton's CPU interpreter, against the eager bodies.

    The interpreter must be on before Triton is first imported (its own library functions are
    compiled at import), so the comparison runs in a fresh interpreter process."""
    pytest.importorskip("triton")
    script = Path(__file__).with_name("triton_interpreted_check.py")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("ok ") == 23, done.stdout


def test_triton_kernels_are_the_default_and_compile_is_chosen_on_request(monkeypatch):
    calls = []
    monkeypatch.setattr(fused, "fusion_enabled", lambda x: True)
    monkeypatch.setattr(fused.fused_triton, "triton_runs_on", lambda x: True)
    monkeypatch.setattr(fused.fused_triton, "gelu_tanh_glu", lambda x: calls.append("triton") or x)
    monkeypatch.setattr(fused, "_compiled", lambda fn: (lambda *a: calls.append("compile") or a[0]))
    x = torch.zeros(2, 4)
    monkeypatch.delenv("VLM_BRIDGE_FUSED", raising=False)
    fused.gelu_tanh_glu(x)
    monkeypatch.setenv("VLM_BRIDGE_FUSED", "compile")
    fused.gelu_tanh_glu(x)
    monkeypatch.setenv("VLM_BRIDGE_FUSED", "triton")
    fused.gelu_tanh_glu(x)
    # Without a hand-written kernel (Triton missing), the default compiles.
    monkeypatch.delenv("VLM_BRIDGE_FUSED")
    monkeypatch.setattr(fused.fused_triton, "triton_runs_on", lambda x: False)
    fused.gelu_tanh_glu(x)
    assert calls == ["triton", "compile", "triton", "compile"]


def test_many_layouts_compile_past_dynamos_default_limit(traced, recwarn):
    """Norms see ``[s, b, h]``, per-head ``[s, b, n, d]`` slices and flat tokens; a one-row
    micro-batch has a size-1 dim that dynamo specialises. Each layout is its own compiled variant,
    and a step mixing 4-row and 1-row micro-batches made more than dynamo's default 8 (a hard
    failure under fullgraph=True): they all compile, and compute what the eager body does."""
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(16, generator=gen)
    shapes = ((7, 1, 16), (7, 4, 16), (7, 4, 3, 16))
    for shape in shapes:
        x, residual = torch.randn(2, *shape, generator=gen)
        got = _values_and_grads(lambda a, b, c: fused.fp32_rms_norm(a, b, 1.0, 1e-6, c), x, w, residual)
        want = _values_and_grads(lambda a, b, c: fused._rms_norm_add(a, b, c, 1.0, 1e-6), x, w, residual)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        for view in (x, x.transpose(0, -2)):
            got = _values_and_grads(lambda a, b: fused.fp32_rms_norm(a, b, 1.0, 1e-6), view, w)
            want = _values_and_grads(lambda a, b: fused._rms_norm(a, b, 1.0, 1e-6), view, w)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert traced.frame_count > 8
    assert not [w for w in recwarn if "recompile limit" in str(w.message)]


def test_recompile_limit_falls_back_to_eager(traced, monkeypatch):
    fused._warn_eager_fallback.cache_clear()
    monkeypatch.setattr(dynamo, "RECOMPILE_LIMIT", 1)
    x, w = torch.randn(4, 8), torch.randn(8)
    with torch._dynamo.config.patch(recompile_limit=1), pytest.warns(UserWarning, match="recompile limit"):
        fused.fp32_rms_norm(x, w, 1.0, 1e-6)
        out = fused.fp32_rms_norm(x.double(), w.double(), 1.0, 1e-6)  # a second variant: over the limit
    torch.testing.assert_close(out, fused._rms_norm(x.double(), w.double(), 1.0, 1e-6), rtol=0, atol=0)


def test_kernels_that_fail_their_self_check_are_not_used(monkeypatch):
    """A kernel set that does not compile or disagrees with torch on a device is checked once,
    named in one warning, and left unused there (the torch code runs)."""
    from vlm_bridge.families._common import fused_triton

    monkeypatch.setattr(fused_triton, "_CHECKED", {})
    calls = []

    def broken(device):
        calls.append(device)
        raise RuntimeError("PTX assembly failed")

    with pytest.warns(UserWarning, match="the demo Triton kernels failed their check on cpu .*PTX"):
        assert not fused_triton.passes_self_check("demo", torch.device("cpu"), broken)
    assert not fused_triton.passes_self_check("demo", torch.device("cpu"), broken)
    assert len(calls) == 1
    assert fused_triton.passes_self_check("fine", torch.device("cpu"), lambda device: None)


def _gradient_check(device):
    """A self-check that needs autograd and saves tensors for its backward, as a kernel check does."""
    leaf = torch.arange(4.0, device=device).requires_grad_()
    (leaf * leaf).sum().backward()
    torch.testing.assert_close(leaf.grad, 2 * leaf.detach())


@pytest.mark.parametrize("where", ["checkpoint", "inference_mode", "no_grad"])
def test_a_first_use_inside_autograd_state_checks_apart_from_it(where, monkeypatch):
    """A kernel's first use can come inside a recomputed (checkpointed) layer, under no_grad or in
    generation's inference mode. The check must pass there, and a checkpointed layer whose forward
    made the check must still recompute and give the same gradient (the check's tensors were once
    taken for the layer's own: 'a different number of tensors was saved')."""
    from vlm_bridge.families._common import fused_triton

    monkeypatch.setattr(fused_triton, "_CHECKED", {})
    passed = []

    def layer(x):
        if not fused_triton._CHECKED:  # first use only, as in a real step
            passed.append(fused_triton.passes_self_check("demo", torch.device("cpu"), _gradient_check))
        return (x * x).sin()

    x = torch.randn(6, requires_grad=True)
    if where == "checkpoint":
        torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False).sum().backward()
        torch.testing.assert_close(x.grad, (2 * x * (x * x).cos()).detach())
    else:
        with torch.inference_mode() if where == "inference_mode" else torch.no_grad():
            layer(x.detach())
    assert passed == [True]
