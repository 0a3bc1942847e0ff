"""The Triton (fla-core) Mamba-2 scan equals the torch scan on a GPU, packed rows included."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_scan_matches_torch_scan_with_packing():
    from vlm_bridge.families._common import ssd_triton
    from vlm_bridge.families._common.ssd_scan import segment_runs, ssd_scan

    if not ssd_triton.available(torch.device("cuda")):
        pytest.skip("fla-core is not installed")
    gen = torch.Generator().manual_seed(0)
    b, s, h, p, g, n = 2, 300, 8, 80, 2, 64
    x = torch.randn(b, s, h, p, generator=gen).cuda()
    dt = torch.nn.functional.softplus(torch.randn(b, s, h, generator=gen) - 2).cuda()
    A = -torch.rand(h, generator=gen).add(0.5).cuda()
    B, C = (torch.randn(b, s, g, n, generator=gen).cuda() for _ in range(2))
    segments = torch.zeros(b, s, dtype=torch.long)
    segments[0, 120:] = 1
    segments[1, 250:] = -1
    runs = segment_runs(segments.cuda())
    ref, _ = ssd_scan(x, dt, A, B, C, 64, runs)
    fast = ssd_triton.triton_scan(x, dt, A, B, C, runs)
    assert float((fast - ref).abs().max()) <= 2e-3 * float(ref.abs().max())
