"""Model FLOPs of one training step of a Qwen-VL model (Qwen2.5-VL, Qwen3-VL dense and MoE).

Real tokens only (T = LM tokens incl. image tokens, P = ViT patches, h_attn = heads x head_dim of
the LM, hv = ViT hidden, n = LM layers). N_lm = LM parameters active per token except the input
embedding (the output layer is a matmul on every token and counts; of the routed experts only
top_k / num_experts count):
  LM dense 6 * N_lm * T;  ViT dense 6 * N_vit * P + 6 * N_merger * P / 4 (mergers, DeepStack ones
  too, run on 2x2 groups; the learned position table is a lookup and does not count);
  LM attention, per packed sample of length L: 2 * 2 * L^2 * h_attn * n / 2 forward (QK^T and AV,
  causal half), x3 for forward + backward;
  ViT attention (non-causal) per window (Qwen2.5 windowed blocks) or image (full blocks) of w
  patches: 3 * 4 * w^2 * hv per block.
LoRA: frozen weights get no weight gradient (LM dense 4 * N_lm * T) and the frozen ViT runs forward
only (x1/3); adapter FLOPs (<1%) are not counted.
"""

from __future__ import annotations

from pathlib import Path

import torch


def _part(key: str) -> str | None:
    if key.endswith(("embed_tokens.weight", "lm_head.weight")):
        return None
    if "visual." in key:
        if "pos_embed" in key:
            return None
        return "merger" if (".merger." in key or "deepstack_merger" in key) else "vit"
    return "experts" if ".mlp.experts." in key else "lm"


def model_flops(hf_dir: Path, encoded: list, lora: bool) -> dict:
    """FLOPs of one step over ``encoded`` (see the module docstring for the formula)."""
    from make_checkpoint import tensor_specs
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(hf_dir, local_files_only=True)
    tc, vc = config.text_config, config.vision_config
    count = {"all": 0, "lm": 0, "experts": 0, "vit": 0, "merger": 0}
    for key, shape in tensor_specs(config):
        numel = torch.Size(shape).numel()
        count["all"] += numel
        if part := _part(key):
            count[part] += numel
    count["lm"] += tc.vocab_size * tc.hidden_size  # the output layer (tied or not)
    experts = getattr(tc, "num_experts", 0) or 0
    active_lm = count["lm"] + (count["experts"] * tc.num_experts_per_tok / experts if experts else 0)
    tokens = sum(len(s) for s in encoded)
    grids = torch.cat([s.image_grid_thw for s in encoded])
    patches = int(grids.prod(-1).sum())
    sq = lambda cu: float((torch.as_tensor(cu).diff().double() ** 2).sum())  # noqa: E731
    images = torch.nn.functional.pad(grids.prod(-1).cumsum(0), (1, 0))
    if hasattr(vc, "fullatt_block_indexes"):  # Qwen2.5-VL: windowed blocks + a few full ones
        from transformers.vision_utils import get_vision_window_index

        windows = get_vision_window_index(grids, vc.spatial_merge_size, vc.window_size, vc.patch_size)[1]
        full = len(vc.fullatt_block_indexes)
        vit_attn = 4 * vc.hidden_size * ((vc.depth - full) * sq(windows) + full * sq(images))
    else:  # Qwen3-VL: every block attends over the whole image
        vit_attn = 4 * vc.hidden_size * vc.depth * sq(images)
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    attn_width = tc.num_attention_heads * head_dim
    lm_attn = 2 * attn_width * tc.num_hidden_layers * sum(len(s) ** 2 for s in encoded)
    dense, vit_passes = (4, 1) if lora else (6, 3)
    parts = {"lm_dense": dense * active_lm * tokens, "lm_attention": 3 * lm_attn,
             "vit_dense": 2 * vit_passes * (count["vit"] * patches + count["merger"] * patches / 4),
             "vit_attention": vit_passes * vit_attn}
    return {"total": sum(parts.values()), **parts, "params": count, "active_lm_params": active_lm,
            "lm_tokens": tokens, "patches": patches}
