"""An export gathers each TP-split tensor on the rank that writes it only: the other ranks hold
their own piece and no full copy (each held the full tensor, and the pieces beside it, before).
Whole rows go straight into the full tensor; column splits and tables of parts (GLU gate/up, Q/K/V
of unequal sizes) are put back in order, as on every rank."""

from __future__ import annotations

import torch

from vlm_bridge.parallel import ParallelConfig, init_distributed, run_parallel

CASES = [(0, 1), (1, 1), (0, 2), (0, (8, 4, 4))]  # (partition dim, chunks)


def _gathered(dim_chunks: list) -> list:
    import torch.distributed as dist

    from vlm_bridge.convert.distribute import gather, shard

    init_distributed(ParallelConfig(tp=2))
    out = []
    for dim, chunks in dim_chunks:
        full = torch.arange(16 * 6, dtype=torch.float32).reshape(16, 6)
        full = full if dim == 0 else full.t().contiguous()
        param = torch.nn.Parameter(torch.empty(0))
        param.tensor_model_parallel, param.partition_dim = True, dim
        local = shard(full, param, chunks)
        everywhere = gather(local, param, chunks)
        writer_only = gather(local, param, chunks, first_only=True)
        out.append((dist.get_rank(), torch.equal(everywhere, full),
                    None if writer_only is None else torch.equal(writer_only, full)))
    gathered = [None, None]
    dist.all_gather_object(gathered, out)
    return gathered


def test_only_the_writing_rank_receives_the_full_tensor():
    ranks = run_parallel(_gathered, 2, CASES)
    for rank, results in enumerate(ranks):
        for (dim, chunks), (seen_rank, everywhere, writer_only) in zip(CASES, results, strict=True):
            assert seen_rank == rank and everywhere, (dim, chunks)
            assert writer_only is (True if rank == 0 else None), (rank, dim, chunks)
