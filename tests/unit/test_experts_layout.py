"""Unit tests for vlm_bridge.convert.experts: telling the fused expert layouts apart, splitting and
re-fusing (fast, CPU only, tiny tensors, no model)."""

from __future__ import annotations

import pytest
import torch

from vlm_bridge.convert.experts import (
    FUSED_HUB,
    FUSED_OUT_IN,
    PER_EXPERT,
    ExpertFusingWriter,
    ExpertSplitReader,
    detect_expert_layout,
)
from vlm_bridge.convert.hf_io import CheckpointError

E, H = 3, 32
L0, L1 = "model.language_model.layers.0.mlp.experts", "model.language_model.layers.1.mlp.experts"
OTHER = "model.language_model.layers.0.self_attn.q_proj.weight"


class FakeReader:
    """The slice of SafetensorsReader the expert code uses, over a dict of tensors."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def keys(self) -> list[str]:
        return sorted(self.tensors)

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.tensors[name].dtype

    def get(self, name: str, copy: bool = True) -> torch.Tensor:
        return self.tensors[name]


class FakeWriter:
    def __init__(self) -> None:
        self.added: dict[str, torch.Tensor] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        assert name not in self.added, name
        self.added[name] = tensor

    def finalize(self) -> dict[str, str]:
        return {}


def _experts(inter: int, seed: int) -> dict[str, torch.Tensor]:
    """Per-expert Linear weights ([out, in]) of one layer, distinct values everywhere."""
    g = torch.Generator().manual_seed(seed)
    return {"gate": torch.randn(E, inter, H, generator=g), "up": torch.randn(E, inter, H, generator=g),
            "down": torch.randn(E, H, inter, generator=g)}


def _fuse(parts: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """gate_up / down in `layout`, built independently of the code under test."""
    gate_up = torch.cat([parts["gate"], parts["up"]], dim=1)  # [E, 2I, H]
    down = parts["down"]  # [E, H, I]
    if layout == FUSED_HUB:
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    return {"gate_up_proj": gate_up.contiguous(), "down_proj": down.contiguous()}


def _checkpoint(layers: list[tuple[str, int]], drop: str | None = None):
    """A fake reader with one (layout, intermediate size) per layer, plus a non-expert tensor.

    Returns the reader and each layer's per-expert reference weights."""
    tensors = {OTHER: torch.randn(H, H)}
    refs = {}
    for i, (layout, inter) in enumerate(layers):
        prefix = f"model.language_model.layers.{i}.mlp.experts"
        refs[prefix] = _experts(inter, seed=i)
        for role, t in _fuse(refs[prefix], layout).items():
            if role != drop:
                tensors[f"{prefix}.{role}"] = t
    return FakeReader(tensors), refs


def _shapes(tensors: dict[str, list[int]]) -> FakeReader:
    return FakeReader({k: torch.zeros(*shape) for k, shape in tensors.items()})


@pytest.mark.parametrize("layout", [FUSED_HUB, FUSED_OUT_IN])
def test_square_gate_up_is_told_by_down_proj(layout):
    """transformers' tiny Qwen3-VL-MoE config: hidden 32, moe_intermediate 16 -> gate_up [E, 32, 32]."""
    reader, _ = _checkpoint([(layout, 16), (layout, 16)])
    assert reader.shape(f"{L0}.gate_up_proj") == (E, H, H)
    assert detect_expert_layout(reader, H) == layout


@pytest.mark.parametrize("layout", [FUSED_HUB, FUSED_OUT_IN])
def test_square_layer_is_told_by_another_layer(layout):
    """A layer with only a square gate_up follows the non-square layer next to it."""
    reader, _ = _checkpoint([(layout, 16), (layout, 24)], drop="down_proj")
    assert detect_expert_layout(reader, H) == layout


@pytest.mark.parametrize("layout", [FUSED_HUB, FUSED_OUT_IN])
@pytest.mark.parametrize("inter", [16, 24], ids=["square", "not_square"])
def test_unambiguous_layouts_still_detected(layout, inter):
    reader, _ = _checkpoint([(layout, inter), (layout, inter)])
    assert detect_expert_layout(reader, H) == layout


def test_per_expert_checkpoint():
    reader = _shapes({OTHER: [H, H], f"{L0}.0.gate_proj.weight": [16, H], f"{L0}.0.up_proj.weight": [16, H],
                      f"{L0}.0.down_proj.weight": [H, 16]})
    assert detect_expert_layout(reader, H) == PER_EXPERT


@pytest.mark.parametrize("layout", [FUSED_HUB, FUSED_OUT_IN])
@pytest.mark.parametrize("inter", [16, 24], ids=["square", "not_square"])
def test_split_reader_gives_per_expert_slices(layout, inter):
    reader, refs = _checkpoint([(layout, inter), (layout, inter)])
    split = ExpertSplitReader(reader, detect_expert_layout(reader, H))
    names = [f"{p}.{e}.{proj}.weight" for p in refs for e in range(E) for proj in ("gate_proj", "up_proj",
                                                                                     "down_proj")]
    assert split.keys() == sorted(names + [OTHER])
    assert f"{L0}.gate_up_proj" not in split and f"{L0}.1.up_proj.weight" in split and OTHER in split
    for prefix, ref in refs.items():
        for e in range(E):
            for proj, expected in (("gate_proj", ref["gate"][e]), ("up_proj", ref["up"][e]),
                                   ("down_proj", ref["down"][e])):
                name = f"{prefix}.{e}.{proj}.weight"
                got = split.get(name)
                assert torch.equal(got, expected), name
                assert split.shape(name) == tuple(got.shape), name
                assert split.dtype(name) == got.dtype
    # The slice by hand, from the tensor on disk: up is the second half of 2I.
    fused = reader.get(f"{L1}.gate_up_proj")
    up_1 = fused[1, :, inter:].T if layout == FUSED_HUB else fused[1, inter:, :]
    assert torch.equal(split.get(f"{L1}.1.up_proj.weight"), up_1)
    assert torch.equal(split.get(OTHER), reader.get(OTHER))


@pytest.mark.parametrize("layout", [FUSED_HUB, FUSED_OUT_IN])
@pytest.mark.parametrize("inter", [16, 24], ids=["square", "not_square"])
def test_fusing_writer_restores_the_fused_tensors(layout, inter):
    reader, _ = _checkpoint([(layout, inter), (layout, inter)])
    split = ExpertSplitReader(reader, detect_expert_layout(reader, H))
    out = FakeWriter()
    writer = ExpertFusingWriter(out, layout, num_experts=E)
    for name in reversed(split.keys()):  # any order: the writer buffers until a layer is complete
        writer.add(name, split.get(name).clone())
    writer.finalize()
    assert sorted(out.added) == reader.keys()
    for name in reader.keys():
        assert torch.equal(out.added[name], reader.get(name)), name
        assert out.added[name].is_contiguous()


@pytest.mark.parametrize(
    "tensors",
    [
        {f"{L0}.gate_up_proj": [E, H, H], f"{L1}.gate_up_proj": [E, H, H]},  # hidden == 2I, no down
        {f"{L0}.down_proj": [E, H, H]},  # hidden == I, no gate_up
        {f"{L0}.gate_up_proj": [E, H, H], f"{L1}.down_proj": [E, H, H]},  # each square, other layers
    ],
    ids=["gate_up_only", "down_only", "split_over_layers"],
)
def test_all_square_is_ambiguous(tensors):
    with pytest.raises(CheckpointError, match="ambiguous") as err:
        detect_expert_layout(_shapes(tensors), H)
    msg = str(err.value)
    assert "\n" not in msg and "hidden size 32" in msg
    assert min(tensors) in msg and str(tuple(tensors[min(tensors)])) in msg


@pytest.mark.parametrize("square", [False, True], ids=["not_square", "square_gate_up"])
def test_mixed_layouts_across_layers(square):
    hub, _ = _checkpoint([(FUSED_HUB, 24)])
    out_in, _ = _checkpoint([(FUSED_OUT_IN, 16 if square else 24)])
    tensors = dict(hub.tensors)
    tensors.update({k.replace(".layers.0.", ".layers.1."): v for k, v in out_in.tensors.items()})
    with pytest.raises(CheckpointError, match="mix inner orders") as err:
        detect_expert_layout(FakeReader(tensors), H)
    msg = str(err.value)
    # Names the hub tensor that decided the order and the out-in one that contradicts it.
    assert "\n" not in msg and f"{L0}.down_proj (3, 24, 32)" in msg and f"{L1}.down_proj (3, 32, " in msg


def test_mixed_layouts_within_a_layer():
    tensors = {f"{L0}.gate_up_proj": [E, H, 48], f"{L0}.down_proj": [E, H, 24]}  # hub, then out-in
    with pytest.raises(CheckpointError, match="mix inner orders") as err:
        detect_expert_layout(_shapes(tensors), H)
    msg = str(err.value)
    assert f"{L0}.gate_up_proj (3, 32, 48)" in msg and f"{L0}.down_proj (3, 32, 24)" in msg


def test_square_gate_up_with_the_wrong_intermediate_size():
    """A square gate_up implies 2I == hidden; a down_proj with another I contradicts it."""
    tensors = {f"{L0}.gate_up_proj": [4, 64, 64], f"{L0}.down_proj": [4, 64, 24]}
    with pytest.raises(CheckpointError, match="disagree on the expert intermediate size") as err:
        detect_expert_layout(_shapes(tensors), 64)
    msg = str(err.value)
    assert "\n" not in msg and "(4, 64, 64)" in msg and "(4, 64, 24)" in msg and "2I = 64 but I = 24" in msg


def test_gate_up_and_down_disagree_on_the_intermediate_size():
    tensors = {f"{L0}.gate_up_proj": [E, 48, H], f"{L0}.down_proj": [E, H, 16]}
    with pytest.raises(CheckpointError, match="2I = 48 but I = 16"):
        detect_expert_layout(_shapes(tensors), H)


def test_both_square_in_one_layer_is_contradictory():
    """gate_up square says I = hidden / 2, down square says I = hidden: no layout fits."""
    tensors = {f"{L0}.gate_up_proj": [E, H, H], f"{L0}.down_proj": [E, H, H]}
    with pytest.raises(CheckpointError, match="disagree on the expert intermediate size"):
        detect_expert_layout(_shapes(tensors), H)


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ([E, 48, 40], "neither inner dimension equals the hidden size 32"),
        ([E, H, 15], "is odd"),
        ([E, 33, 33], "neither inner dimension"),
        ([E * 48, H], "expected a 3-D fused expert tensor"),
    ],
)
def test_bad_gate_up_shapes(shape, message):
    tensors = {f"{L0}.gate_up_proj": shape, f"{L0}.down_proj": [E, H, 24]}
    with pytest.raises(CheckpointError, match=message) as err:
        detect_expert_layout(_shapes(tensors), H)
    assert f"{L0}.gate_up_proj" in str(err.value) and "\n" not in str(err.value)


def test_down_without_the_hidden_size():
    with pytest.raises(CheckpointError, match="neither inner dimension") as err:
        detect_expert_layout(_shapes({f"{L0}.down_proj": [E, 24, 40]}), H)
    assert f"{L0}.down_proj (3, 24, 40)" in str(err.value)


MIXER = "model.layers.2.mixer.experts"


def _ungated(inter: int, seed: int) -> dict[str, torch.Tensor]:
    """Per-expert up/down weights ([out, in]) of experts without a gate (e.g. squared ReLU)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for e in range(E):
        out[f"{MIXER}.{e}.up_proj.weight"] = torch.randn(inter, H, generator=g)
        out[f"{MIXER}.{e}.down_proj.weight"] = torch.randn(H, inter, generator=g)
    return out


@pytest.mark.parametrize("layout", [FUSED_HUB, FUSED_OUT_IN])
def test_experts_without_a_gate_split_and_fuse_back_as_they_came(layout):
    """Fused ``up_proj`` / ``down_proj`` (no gate_up) are detected in either inner order, split into
    the per-expert names and re-fused bit-exactly; a writer for gated experts would not."""
    inter = 24
    per_expert = _ungated(inter, seed=7)
    up = torch.stack([per_expert[f"{MIXER}.{e}.up_proj.weight"] for e in range(E)])  # [E, I, H]
    down = torch.stack([per_expert[f"{MIXER}.{e}.down_proj.weight"] for e in range(E)])  # [E, H, I]
    if layout == FUSED_HUB:
        up, down = up.transpose(1, 2), down.transpose(1, 2)
    fused = {f"{MIXER}.up_proj": up.contiguous(), f"{MIXER}.down_proj": down.contiguous()}
    reader = FakeReader(fused)
    assert detect_expert_layout(reader, H) == layout
    split = ExpertSplitReader(reader, layout)
    assert split.keys() == sorted(per_expert)
    for name, tensor in per_expert.items():
        assert split.shape(name) == tuple(tensor.shape)
        assert torch.equal(split.get(name), tensor), name
    writer = FakeWriter()
    fusing = ExpertFusingWriter(writer, layout, E, gated=False)
    for name in sorted(per_expert):
        fusing.add(name, split.get(name))
    fusing.finalize()
    assert set(writer.added) == set(fused)
    assert all(torch.equal(writer.added[k], fused[k]) for k in fused)


def test_experts_without_a_gate_that_disagree_on_the_intermediate_size():
    up = torch.zeros(E, 24, H)  # out-in: I = 24
    down = torch.zeros(E, H, 16)  # out-in: I = 16
    with pytest.raises(CheckpointError, match="I = 24 but I = 16"):
        detect_expert_layout(FakeReader({f"{MIXER}.up_proj": up, f"{MIXER}.down_proj": down}), H)
