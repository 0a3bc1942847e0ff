"""MoE expert layouts on disk: fused 3-D tensors <-> one tensor per expert.

Checkpoints store experts either per expert (``mlp.experts.E.{gate,up,down}_proj.weight``) or
fused: ``mlp.experts.gate_up_proj`` and ``mlp.experts.down_proj`` with the experts stacked first.
The fused tensors come in two inner orders: the hub's ``[E, hidden, 2*inter]`` / ``[E, inter,
hidden]`` and the ``[E, 2*inter, hidden]`` / ``[E, hidden, inter]`` some transformers versions
write. The order is decided by which dimension equals the hidden size; when both do (hidden ==
2*inter, or hidden == inter for down_proj), the checkpoint is ambiguous and we refuse it.

Family tables name experts one by one. :class:`ExpertSplitReader` presents fused checkpoints under
those names (reading each fused tensor once per layer), and :class:`ExpertFusingWriter` re-fuses
them on export, buffering one layer's experts at a time.
"""

from __future__ import annotations

import re

import torch

from vlm_bridge.convert.hf_io import CheckpointError

PER_EXPERT = "per_expert"
FUSED_HUB = "fused_hub"  # gate_up [E, hidden, 2I], down [E, I, hidden]
FUSED_OUT_IN = "fused_out_in"  # gate_up [E, 2I, hidden], down [E, hidden, I]
LAYOUTS = (PER_EXPERT, FUSED_HUB, FUSED_OUT_IN)

_FUSED = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")
_SPLIT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def _orientation(name: str, shape: tuple[int, ...], hidden: int) -> str:
    if len(shape) != 3:
        raise CheckpointError(f"{name}: expected a 3-D fused expert tensor, found shape {shape}")
    first, second = shape[1] == hidden, shape[2] == hidden
    if first == second:
        raise CheckpointError(
            f"{name} {shape}: cannot tell the inner order of fused experts (hidden size {hidden}); "
            "convert it to per-expert tensors first"
        )
    is_gate_up = name.endswith("gate_up_proj")
    # gate_up: hub stores [E, hidden, 2I]; down: hub stores [E, I, hidden].
    return FUSED_HUB if first == is_gate_up else FUSED_OUT_IN


def detect_expert_layout(reader, hidden: int) -> str:
    fused = [k for k in reader.keys() if _FUSED.match(k)]
    if not fused:
        return PER_EXPERT
    found = {_orientation(k, tuple(reader.shape(k)), hidden) for k in fused}
    if len(found) > 1:
        raise CheckpointError("fused expert tensors mix two inner orders; cannot convert")
    return found.pop()


class ExpertSplitReader:
    """A reader whose fused expert tensors appear as per-expert tensors (read lazily)."""

    def __init__(self, reader, layout: str) -> None:
        self.reader, self.layout = reader, layout
        self._virtual: dict[str, tuple[str, int, str]] = {}
        for key in reader.keys():
            match = _FUSED.match(key)
            if match:
                experts = reader.shape(key)[0]
                projs = ("gate_proj", "up_proj") if match.group(2) == "gate_up_proj" else ("down_proj",)
                for e in range(experts):
                    for proj in projs:
                        self._virtual[f"{match.group(1)}.{e}.{proj}.weight"] = (key, e, proj)
        self._cache: tuple[str, torch.Tensor] | None = None

    def keys(self) -> list[str]:
        real = [k for k in self.reader.keys() if not _FUSED.match(k)]
        return sorted(real + list(self._virtual))

    def __contains__(self, name: object) -> bool:
        return name in self._virtual or (name in self.reader and not _FUSED.match(str(name)))

    def _fused(self, key: str) -> torch.Tensor:
        if self._cache is None or self._cache[0] != key:
            t = self.reader.get(key)
            self._cache = (key, t if self.layout == FUSED_OUT_IN else t.transpose(1, 2))
        return self._cache[1]  # [E, out, in], like a Linear weight per expert

    def _split(self, name: str) -> torch.Tensor:
        key, e, proj = self._virtual[name]
        w = self._fused(key)[e]
        if proj == "down_proj":
            return w.contiguous()
        gate, up = w.chunk(2, dim=0)
        return (gate if proj == "gate_proj" else up).contiguous()

    def get(self, name: str) -> torch.Tensor:
        return self._split(name) if name in self._virtual else self.reader.get(name)

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._virtual:
            return self.reader.shape(name)
        key, _, proj = self._virtual[name]
        e_, a, b = self.reader.shape(key)
        out, inp = (b, a) if self.layout == FUSED_HUB else (a, b)
        return (out // 2, inp) if proj != "down_proj" else (out, inp)

    def dtype(self, name: str) -> torch.dtype:
        return self.reader.dtype(self._virtual[name][0] if name in self._virtual else name)

    def __getattr__(self, name: str):
        return getattr(self.reader, name)


class ExpertFusingWriter:
    """Passes tensors through, except per-expert tensors, which it stacks into fused ones."""

    def __init__(self, writer, layout: str, num_experts: int) -> None:
        self.writer, self.layout, self.num_experts = writer, layout, num_experts
        self._parts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        match = _SPLIT.match(name) if self.layout != PER_EXPERT else None
        if not match:
            self.writer.add(name, tensor)
            return
        prefix, e, proj = match.group(1), int(match.group(2)), match.group(3)
        fused = "down_proj" if proj == "down_proj" else "gate_up_proj"
        parts = self._parts.setdefault((prefix, fused), {})
        parts[(e, proj)] = tensor
        need = self.num_experts * (1 if fused == "down_proj" else 2)
        if len(parts) == need:
            del self._parts[(prefix, fused)]
            if fused == "down_proj":
                stack = torch.stack([parts[(i, "down_proj")] for i in range(self.num_experts)])
            else:
                stack = torch.stack([torch.cat([parts[(i, "gate_proj")], parts[(i, "up_proj")]])
                                     for i in range(self.num_experts)])
            if self.layout == FUSED_HUB:
                stack = stack.transpose(1, 2)
            self.writer.add(f"{prefix}.{fused}", stack.contiguous())

    def finalize(self) -> dict[str, str]:
        assert not self._parts, f"incomplete fused experts: {sorted(self._parts)[:3]}"
        return self.writer.finalize()
