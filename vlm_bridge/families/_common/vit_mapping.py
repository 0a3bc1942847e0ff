"""Weight-table rows of one pre-LN ViT block with biases (SigLIP, RADIO): the Megatron layer's
norms, fused QKV, attention output and two-matrix MLP, from the HF block's own module names."""

from __future__ import annotations

from vlm_bridge.convert.ops import Entry, FuseQKV, Rename

# Megatron sub-modules of a ViT block besides the fused QKV
VIT_ROLES = ("input_layernorm", "self_attention.linear_proj", "pre_mlp_layernorm", "mlp.linear_fc1",
             "mlp.linear_fc2")


def vit_block_entries(m: str, h: str, hf_names: dict[str, str], qkv_names: tuple[str, str, str],
                      qkv: FuseQKV, qkv_bias: bool = True) -> list[Entry]:
    """Megatron layer prefix ``m`` <- HF block prefix ``h``; ``hf_names`` maps each of
    :data:`VIT_ROLES` to the HF module, ``qkv_names`` the q, k, v modules fused into ``linear_qkv``."""
    out = []
    for suffix in ("weight", "bias"):
        if suffix == "weight" or qkv_bias:
            out.append(Entry(m + f"self_attention.linear_qkv.{suffix}",
                             tuple(h + f"{n}.{suffix}" for n in qkv_names), qkv))
        out += [Entry(m + f"{role}.{suffix}", (h + f"{hf_names[role]}.{suffix}",), Rename())
                for role in VIT_ROLES]
    return out
