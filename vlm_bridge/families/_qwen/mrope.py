"""3-D (temporal, height, width) position ids for multimodal rotary embeddings (Qwen-VL style).

Text tokens advance all three axes together. A vision span of grid ``(t, h, w)`` (after the 2x2
merge) gets ``(t_index * interval, row, col)`` offset by the current position, where ``interval``
is ``tokens_per_second * second_per_grid_t`` for video and 1 for images; the text after it resumes
at ``start + max(h, w)``, as transformers 5.x computes it. Padding (``attention_mask == 0``) gets 0.
"""

from __future__ import annotations

import torch


def _vision_positions(start: int, grid: list[int], merge: int, interval: float) -> torch.Tensor:
    t, h, w = grid[0], grid[1] // merge, grid[2] // merge
    tt = (torch.arange(t) * interval).long()
    hh = torch.arange(h) + start
    ww = torch.arange(w) + start
    tg, hg, wg = torch.meshgrid(tt, hh, ww, indexing="ij")
    pos = torch.stack([tg, hg, wg]).reshape(3, -1)
    pos[0] += start
    return pos


def mrope_position_ids(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    image_grid_thw: torch.Tensor | None,
    video_grid_thw: torch.Tensor | None,
    *,
    image_token_id: int,
    video_token_id: int,
    spatial_merge_size: int,
    tokens_per_second: float = 1.0,
    second_per_grid_ts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return ``[3, b, s]`` position ids for a (padded) batch."""
    b, s = input_ids.shape
    out = torch.zeros(3, b, s, dtype=torch.long)
    grids = {
        1: iter(image_grid_thw.tolist() if image_grid_thw is not None else []),
        2: iter(video_grid_thw.tolist() if video_grid_thw is not None else []),
    }
    seconds = iter(second_per_grid_ts.tolist() if second_per_grid_ts is not None else [])
    ids_cpu = input_ids.cpu()
    keep_all = (
        attention_mask.cpu().bool() if attention_mask is not None else torch.ones(b, s, dtype=bool)
    )
    for row in range(b):
        keep = keep_all[row]
        ids = ids_cpu[row][keep]
        kind = torch.zeros_like(ids)
        kind[ids == image_token_id] = 1
        kind[ids == video_token_id] = 2
        pieces, pos, i = [], 0, 0
        while i < len(ids):
            j = i
            while j < len(ids) and kind[j] == kind[i]:
                j += 1
            if kind[i] == 0:
                pieces.append(torch.arange(j - i).expand(3, -1) + pos)
                pos += j - i
            else:
                # A run of placeholders may hold several consecutive images; take grids until full.
                k = i
                while k < j:
                    grid = next(grids[int(kind[i])])
                    interval = tokens_per_second * next(seconds, 1.0) if kind[i] == 2 else 1
                    piece = _vision_positions(pos, grid, spatial_merge_size, interval)
                    pieces.append(piece)
                    k += piece.shape[1]
                    pos += max(grid[1], grid[2]) // spatial_merge_size
            i = j
        if pieces:
            out[:, row, keep] = torch.cat(pieces, dim=1)
    return out.to(input_ids.device)
