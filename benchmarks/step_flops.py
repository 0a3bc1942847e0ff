"""Model FLOPs of one training step of a Qwen-VL (Qwen2.5-VL, Qwen3-VL dense and MoE), Gemma 3 or Nemotron VL.

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

Gemma 3 (same rules, its own layout): N_lm covers attention, the GeGLU MLP (gate, up, down: 3
matmuls), the norms and the tied output layer (vocab x hidden) once. The SigLIP tower sees every image
whole at 896 px: P = images * (896 / 14)^2 = 4096 patches each (its learned position table is a
lookup, its patch embedding a matmul and counts), full attention within each image (w = 4096, the
formula above), non-gated MLP (both in N_vit). The projector (RMSNorm + 1152 x hidden) runs on the
pooled tokens only: 6 * N_proj * images * mm_tokens_per_image (256; the average pool is free). LM
attention counts query-key pairs: causal L^2 / 2 per sample on the global layers, as for Qwen; on
the local (sliding) layers each query sees at most ``sliding_window`` keys, so L * W - W^2 / 2 once
L > W (L^2 / 2 below it); on every layer each image's m = mm_tokens_per_image soft tokens also see
the later tokens of their image (bidirectional within an image), m^2 / 2 more pairs per image.

Nemotron VL (same rules, its own layout). N_lm is every LM parameter but the input embedding: the
Mamba ``in_proj`` / ``out_proj`` (and the small conv, norm and per-head tensors), the attention and
squared-ReLU MLP matrices, the untied output layer: LM dense 6 * N_lm * T. LM attention only on the
``full_attention`` layers: causal L^2 / 2 pairs per sample, as for Qwen. The Mamba-2 scan (no
weights, so not in N_lm) is counted as the chunked SSD algorithm computes it, per Mamba layer and
token, forward, with H heads of P = head_dim, state size N, chunk Q = min(chunk_size, L) for a
sample of length L:
  intra-chunk 2 * Q * (N + P) * H (C B^T over the chunk, then that masked matrix times x; full
  Q x Q blocks, as computed) + inter-chunk 4 * P * N * H (each chunk's final state B^T x, and the
  carried state read out through C); the state hand-over between chunks (P * N * H per chunk) is
  left out. x3 for forward + backward (LoRA too: the scan has no weights, only input gradients).
The RADIO tower sees each image at its own grid of p patches plus its cls + register tokens (10 at
12B): its blocks run on P = sum(p + prefix) tokens (6 * N_vit * P, full attention within each
image: w = p + prefix in the formula above), the patch projection on the patches only (the CPE
table is an interpolated lookup, the prefix tokens are looked up, the video projection does not run
for images), the projector (RMSNorm, Linear, squared ReLU, Linear) on the p / 4 pixel-shuffled
tokens. Video inputs are not counted (the benchmark's samples hold one image each).
"""

from __future__ import annotations

from pathlib import Path

import torch


def _part(key: str) -> str | None:
    if key.endswith(("embed_tokens.weight", "lm_head.weight")):
        return None
    if key.startswith("vision_tower."):  # Gemma 3's SigLIP (hub keys, see make_checkpoint)
        return None if "position_embedding" in key else "vit"
    if key.startswith("multi_modal_projector."):
        return "merger"
    if "visual." in key:
        if "pos_embed" in key:
            return None
        return "merger" if (".merger." in key or "deepstack_merger" in key) else "vit"
    return "experts" if ".mlp.experts." in key else "lm"


def _nemotron_part(key: str) -> str | None:
    """Nemotron VL's in-memory names (make_checkpoint writes those)."""
    if key.startswith("vision_model."):
        if ".encoder.layer." in key:
            return "vit"
        # the video projection does not run on images; CPE table, prefix tokens, summary_idxs: no matmul
        return "vit_embed" if key.endswith(".patch_projection.weight") else None
    if key.startswith("multi_modal_projector."):
        return "merger"
    if key in ("language_model.model.embeddings.weight", "language_model.lm_head.weight"):
        return None  # the output layer is added back below, as for the other families
    return "lm"


def model_flops(hf_dir: Path, encoded: list, lora: bool) -> dict:
    """FLOPs of one step over ``encoded`` (see the module docstring for the formula)."""
    from make_checkpoint import tensor_specs
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(hf_dir, local_files_only=True)
    tc, vc = config.text_config, config.vision_config
    nemotron = config.model_type == "nemotron_h_omni"
    count = {"all": 0, "lm": 0, "experts": 0, "vit": 0, "merger": 0, **({"vit_embed": 0} if nemotron else {})}
    for key, shape in tensor_specs(config):
        numel = torch.Size(shape).numel()
        count["all"] += numel
        if part := (_nemotron_part if nemotron else _part)(key):
            count[part] += numel
    count["lm"] += tc.vocab_size * tc.hidden_size  # the output layer (tied or not)
    experts = getattr(tc, "num_experts", 0) or 0
    active_lm = count["lm"] + (count["experts"] * tc.num_experts_per_tok / experts if experts else 0)
    tokens = sum(len(s) for s in encoded)
    if nemotron:
        return _nemotron_flops(config, encoded, lora, count, tokens)
    if config.model_type == "gemma3":
        return _gemma3_flops(config, encoded, lora, count, active_lm, tokens)
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


def _causal_pairs(length: int, window: int | None = None) -> float:
    """Query-key pairs of causal attention over ``length`` tokens (L^2 / 2, the module's convention),
    each query seeing at most ``window`` keys (itself included) when one is given."""
    if window is None or length <= window:
        return length * length / 2
    return length * window - window * window / 2


def _gemma3_flops(config, encoded: list, lora: bool, count: dict, active_lm: float, tokens: int) -> dict:
    """Gemma 3's terms (module docstring): windowed local layers, whole-image SigLIP, pooled projector."""
    tc, vc = config.text_config, config.vision_config
    images = sum(int(s.pixel_values.shape[0]) for s in encoded if s.pixel_values is not None)
    per_image = (vc.image_size // vc.patch_size) ** 2
    patches, pooled = images * per_image, images * config.mm_tokens_per_image
    local = sum(kind == "sliding_attention" for kind in tc.layer_types)
    pairs = sum(local * _causal_pairs(len(s), tc.sliding_window)
                + (tc.num_hidden_layers - local) * _causal_pairs(len(s)) for s in encoded)
    pairs += tc.num_hidden_layers * images * config.mm_tokens_per_image ** 2 / 2
    lm_attn = 4 * tc.num_attention_heads * tc.head_dim * pairs  # QK^T and AV, forward
    vit_attn = 4 * vc.hidden_size * vc.num_hidden_layers * images * per_image ** 2
    dense, vit_passes = (4, 1) if lora else (6, 3)
    parts = {"lm_dense": dense * active_lm * tokens, "lm_attention": 3 * lm_attn,
             "vit_dense": 2 * vit_passes * (count["vit"] * patches + count["merger"] * pooled),
             "vit_attention": vit_passes * vit_attn}
    return {"total": sum(parts.values()), **parts, "params": count, "active_lm_params": active_lm,
            "lm_tokens": tokens, "patches": patches, "images": images}


def mamba_scan_flops(tc, length: int) -> float:
    """Forward FLOPs of one Mamba-2 layer's chunked scan over one sample (module docstring)."""
    heads, head_dim, state = tc.mamba_num_heads, tc.mamba_head_dim, tc.ssm_state_size
    chunk = min(tc.chunk_size, length)
    return length * heads * (2 * chunk * (state + head_dim) + 4 * head_dim * state)


def _nemotron_flops(config, encoded: list, lora: bool, count: dict, tokens: int) -> dict:
    """Nemotron VL's terms (module docstring): hybrid LM, Mamba scan, RADIO at each image's own grid."""
    tc, vc = config.text_config, config.vision_config
    kinds = list(tc.layers_block_type)
    grids = [s.image_grid_hw for s in encoded if s.image_grid_hw is not None]
    per_image = torch.cat(grids).prod(-1).double() if grids else torch.zeros(0, dtype=torch.float64)
    images, patches = len(per_image), float(per_image.sum())
    prefix = vc.num_cls_tokens + vc.num_registers
    merge = round(1 / float(config.downsample_ratio)) ** 2
    vit_tokens = patches + prefix * images
    vit_attn = 4 * vc.hidden_size * vc.num_hidden_layers * float(((per_image + prefix) ** 2).sum())
    pairs = sum(len(s) ** 2 / 2 for s in encoded)
    lm_attn = 4 * tc.num_attention_heads * tc.head_dim * kinds.count("full_attention") * pairs
    scan = kinds.count("linear_attention") * sum(mamba_scan_flops(tc, len(s)) for s in encoded)
    active_lm = count["lm"]
    dense, vit_passes = (4, 1) if lora else (6, 3)
    parts = {"lm_dense": dense * active_lm * tokens, "lm_attention": 3 * lm_attn, "mamba_scan": 3 * scan,
             "vit_dense": 2 * vit_passes * (count["vit"] * vit_tokens + count["vit_embed"] * patches
                                            + count["merger"] * patches / merge),
             "vit_attention": vit_passes * vit_attn}
    return {"total": sum(parts.values()), **parts, "params": count, "active_lm_params": active_lm,
            "lm_tokens": tokens, "patches": int(patches), "images": images,
            "vit_tokens": int(vit_tokens), "layers": {k: kinds.count(k) for k in sorted(set(kinds))}}


if __name__ == "__main__":
    raise SystemExit("step_flops.py is the FLOP count sft_step.py reports (model_flops); run sft_step.py")
