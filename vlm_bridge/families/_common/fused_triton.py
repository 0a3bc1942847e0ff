"""Hand-written Triton kernels for :mod:`.fused`'s RMSNorm and GELU-tanh gate.

The ``torch.compile`` path costs a guard check and an AOTAutograd wrapper per call (hundreds of
microseconds of host time, where a step of a 34-layer model makes about 1,400 such calls per
micro-batch) and picks reduction configurations by timing them on each machine. These kernels sit
behind plain autograd Functions: one launch per direction, a fixed reduction order, and the eager
code's roundings (the normed value is rounded to the activation dtype before the residual add, the
gate before the product), so they match the torch reference to fp32 rounding.

Layout: every norm row of the last dimension is one program (the whole row sits in registers; widths up
to 16,384). The weight gradient is summed per program over a strided set of rows into an fp32
partial, and the partials are added by torch. ``TRITON_INTERPRET=1`` runs the same kernels on a
CPU (the tests do).
"""

from __future__ import annotations

import functools
import os
import threading
import warnings
from collections.abc import Callable

import torch

_MAX_WIDTH = 16384


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_runs_on(x: torch.Tensor) -> bool:
    """True where a Triton kernel can take ``x``: a CUDA tensor (any under ``TRITON_INTERPRET=1``,
    Triton's CPU interpreter) with Triton importable."""
    return (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1") and _triton_importable()


_CHECKED: dict[tuple[str, str], bool] = {}


def passes_self_check(name: str, device: torch.device, check: Callable[[torch.device], None]) -> bool:
    """Whether the ``name`` kernels may run on ``device``: ``check(device)`` runs once per process
    and device (it launches them on small inputs against a torch reference and raises on any
    difference). Kernels that do not compile or disagree there are not used, with one warning, and
    the torch code runs instead: a GPU or Triton version they were never run on costs speed, not
    a failed run."""
    key = (name, str(device))
    if key not in _CHECKED:
        try:
            _run_apart(check, device)
            _CHECKED[key] = True
        except Exception as exc:  # noqa: BLE001 - any failure means: do not use these kernels here
            warnings.warn(f"vlm-bridge: the {name} Triton kernels failed their check on {device} "
                          f"({type(exc).__name__}: {str(exc)[:200]}); using torch ops instead", stacklevel=2)
            _CHECKED[key] = False
    return _CHECKED[key]


def _run_apart(check: Callable[[torch.device], None], device: torch.device) -> None:
    """``check(device)`` in a thread of its own. The first use of a kernel can come inside autograd
    state that the check must neither see nor disturb: a checkpointed forward (whose saved-tensor
    hooks would take the check's tensors as the layer's, and whose recomputation stops at its last
    saved tensor), ``no_grad`` or ``inference_mode`` (no gradient to check). A new thread starts
    from torch's defaults for all of these."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            if device.type == "cuda":
                torch.cuda.set_device(device)  # a new thread starts on the first GPU
            check(device)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            errors.append(exc)

    thread = threading.Thread(target=target, name="vlm-bridge-kernel-check")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


def available(x: torch.Tensor) -> bool:
    """True where these kernels can run on ``x``: :func:`triton_runs_on` and a row that fits one
    program."""
    return x.shape[-1] <= _MAX_WIDTH and triton_runs_on(x)


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def rms_norm_fwd(X, W, R, Y, RSTD, N, offset, eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        inside = cols < N
        x = tl.load(X + row * N + cols, mask=inside, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / N + eps)
        w = tl.load(W + cols, mask=inside, other=0.0).to(tl.float32) + offset
        y = (x * rstd * w).to(Y.dtype.element_ty)
        if HAS_RESIDUAL:
            y = (tl.load(R + row * N + cols, mask=inside, other=0.0).to(tl.float32) + y.to(tl.float32))
            y = y.to(Y.dtype.element_ty)
        tl.store(Y + row * N + cols, y, mask=inside)
        tl.store(RSTD + row, rstd)

    @triton.jit
    def rms_norm_bwd(DY, X, W, RSTD, DX, DW_PARTIAL, M, N, offset, programs, BLOCK: tl.constexpr):
        first = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        inside = cols < N
        w = tl.load(W + cols, mask=inside, other=0.0).to(tl.float32) + offset
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        for row in range(first, M, programs):
            base = tl.cast(row, tl.int64) * N
            x = tl.load(X + base + cols, mask=inside, other=0.0).to(tl.float32)
            dy = tl.load(DY + base + cols, mask=inside, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + row)
            x_hat = x * rstd
            dw += dy * x_hat
            dx_hat = dy * w
            dx = rstd * (dx_hat - x_hat * (tl.sum(dx_hat * x_hat, axis=0) / N))
            tl.store(DX + base + cols, dx.to(DX.dtype.element_ty), mask=inside)
        tl.store(DW_PARTIAL + first.to(tl.int64) * N + cols, dw, mask=inside)

    # The gate: one program per (row, block of columns), so any width fits (gated MLPs 20,480 to
    # 43,008 wide are wider than a row kernel takes, and went to the compiled chain: 2.3 ms a call
    # at 20,480 x 16,384 tokens on an H100, a quarter of memory bandwidth) and no index is divided
    # by a run-time width.
    @triton.jit
    def gelu_glu_fwd(X, Y, F, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = col < F
        gate = tl.load(X + row * 2 * F + col, mask=inside, other=0.0).to(tl.float32)
        up = tl.load(X + row * 2 * F + F + col, mask=inside, other=0.0).to(tl.float32)
        t = 2.0 * tl.sigmoid(1.5957691216057308 * (gate + 0.044715 * gate * gate * gate)) - 1.0  # tanh
        act = (0.5 * gate * (1.0 + t)).to(Y.dtype.element_ty).to(tl.float32)  # eager rounds it first
        tl.store(Y + row * F + col, (act * up).to(Y.dtype.element_ty), mask=inside)

    @triton.jit
    def gelu_glu_bwd(DY, X, DX, F, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = col < F
        gate = tl.load(X + row * 2 * F + col, mask=inside, other=0.0).to(tl.float32)
        up = tl.load(X + row * 2 * F + F + col, mask=inside, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * F + col, mask=inside, other=0.0).to(tl.float32)
        t = 2.0 * tl.sigmoid(1.5957691216057308 * (gate + 0.044715 * gate * gate * gate)) - 1.0
        act = (0.5 * gate * (1.0 + t)).to(DX.dtype.element_ty).to(tl.float32)
        slope = 0.5 * (1.0 + t) + 0.5 * gate * (1.0 - t * t) * 0.7978845608028654 * (
            1.0 + 3.0 * 0.044715 * gate * gate)
        tl.store(DX + row * 2 * F + col, (dy * up * slope).to(DX.dtype.element_ty), mask=inside)
        tl.store(DX + row * 2 * F + F + col, (dy * act).to(DX.dtype.element_ty), mask=inside)

    return rms_norm_fwd, rms_norm_bwd, gelu_glu_fwd, gelu_glu_bwd, triton.next_power_of_2, triton.cdiv


@functools.cache
def _processors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _programs_for_weight_gradient(x: torch.Tensor, rows: int) -> int:
    """Four per streaming multiprocessor: enough rows each to amortise the partial's store."""
    return max(1, min(rows, 4 * _processors(x.device)))


def _warps(block: int) -> int:
    """One warp per 256 elements of a row, 1 to 16."""
    return min(max(block // 256, 1), 16)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, residual, offset: float, eps: float):
        fwd, _, _, _, next_pow2, _ = _kernels()
        n = x.shape[-1]
        x2 = x.reshape(-1, n).contiguous()
        res2 = residual.reshape(-1, n).contiguous() if residual is not None else x2
        y = torch.empty_like(x2)
        rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
        block = next_pow2(n)
        fwd[(x2.shape[0],)](x2, weight, res2, y, rstd, n, offset, eps, HAS_RESIDUAL=residual is not None,
                            BLOCK=block, num_warps=_warps(block))
        ctx.save_for_backward(x2, weight, rstd)
        ctx.offset, ctx.shape, ctx.has_residual = offset, x.shape, residual is not None
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        _, bwd, _, _, next_pow2, _ = _kernels()
        x2, weight, rstd = ctx.saved_tensors
        rows, n = x2.shape
        dy2 = dy.reshape(-1, n).contiguous()
        dx = torch.empty_like(x2)
        programs = _programs_for_weight_gradient(x2, rows)
        partial = torch.empty(programs, n, dtype=torch.float32, device=x2.device)
        block = next_pow2(n)
        bwd[(programs,)](dy2, x2, weight, rstd, dx, partial, rows, n, ctx.offset, programs, BLOCK=block,
                         num_warps=_warps(block))
        dw = partial.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None  # frozen under LoRA
        return dx.view(ctx.shape), dw, (dy if ctx.has_residual else None), None, None


class _GeluTanhGlu(torch.autograd.Function):
    BLOCK = 1024

    @staticmethod
    def forward(ctx, x):
        _, _, fwd, _, _, cdiv = _kernels()
        x = x.contiguous()
        f = x.shape[-1] // 2
        y = torch.empty(*x.shape[:-1], f, dtype=x.dtype, device=x.device)
        grid = (y.numel() // f if f else 0, cdiv(f, _GeluTanhGlu.BLOCK))
        if grid[0]:
            fwd[grid](x, y, f, BLOCK=_GeluTanhGlu.BLOCK, num_warps=4)
        ctx.save_for_backward(x)
        return y

    @staticmethod
    def backward(ctx, dy):
        _, _, _, bwd, _, cdiv = _kernels()
        (x,) = ctx.saved_tensors
        dx = torch.empty_like(x)
        f = x.shape[-1] // 2
        grid = (dy.numel() // f if f else 0, cdiv(f, _GeluTanhGlu.BLOCK))
        if grid[0]:
            bwd[grid](dy.contiguous(), x, dx, f, BLOCK=_GeluTanhGlu.BLOCK, num_warps=4)
        return dx


def rms_norm(x: torch.Tensor, weight: torch.Tensor, offset: float, eps: float,
             residual: torch.Tensor | None = None) -> torch.Tensor:
    """As :func:`.fused.fp32_rms_norm`, in one Triton kernel per direction."""
    return _RMSNorm.apply(x, weight, residual, float(offset), float(eps))


def gelu_tanh_glu(x: torch.Tensor) -> torch.Tensor:
    """As :func:`.fused.gelu_tanh_glu`, in one Triton kernel per direction, at any width (an
    elementwise chain: no row has to fit one program)."""
    return _GeluTanhGlu.apply(x)
