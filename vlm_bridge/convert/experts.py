"""MoE expert layouts on disk: fused 3-D tensors <-> one tensor per expert.

Checkpoints store experts either per expert (``mlp.experts.E.{gate,up,down}_proj.weight``) or
fused: ``mlp.experts.gate_up_proj`` and ``mlp.experts.down_proj`` with the experts stacked first.
The fused tensors come in two inner orders: the hub's ``[E, hidden, 2*inter]`` / ``[E, inter,
hidden]`` and the ``[E, 2*inter, hidden]`` / ``[E, hidden, inter]`` some transformers versions
write. Experts without a gate (``up_proj`` only, e.g. squared-ReLU experts under ``mixer.``) fuse
the same way with ``up_proj`` in place of ``gate_up_proj`` (``I`` in place of ``2I``). Each fused
tensor's order is read off which dimension equals the hidden size; a square one (hidden == 2*inter
for gate_up_proj, hidden == inter for down_proj) fits both, so the order is decided over all fused
tensors together, and refused only when every one of them is square.

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

_FUSED = re.compile(r"^(.*\.(?:mlp|mixer)\.experts)\.(gate_up_proj|up_proj|down_proj)$")
_SPLIT = re.compile(r"^(.*\.(?:mlp|mixer)\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


_ORDER = {
    FUSED_HUB: "hub order ([E, hidden, 2I] / [E, I, hidden])",
    FUSED_OUT_IN: "out-in order ([E, 2I, hidden] / [E, hidden, I])",
}
# Index of the hidden dimension in a fused tensor, by (role, layout).
_HIDDEN_AT = {
    ("gate_up_proj", FUSED_HUB): 1,
    ("gate_up_proj", FUSED_OUT_IN): 2,
    ("up_proj", FUSED_HUB): 1,
    ("up_proj", FUSED_OUT_IN): 2,
    ("down_proj", FUSED_HUB): 2,
    ("down_proj", FUSED_OUT_IN): 1,
}


def _readings(name: str, role: str, shape: tuple[int, ...], hidden: int) -> dict[str, int]:
    """The layouts one fused tensor's shape allows, each with the intermediate size I it implies.

    A square tensor (gate_up with hidden == 2I, down with hidden == I) allows both; the caller
    lets the other fused tensors decide."""
    if len(shape) != 3:
        raise CheckpointError(f"{name}: expected a 3-D fused expert tensor, found shape {shape}")
    readings: dict[str, int] = {}
    for layout in (FUSED_HUB, FUSED_OUT_IN):
        at = _HIDDEN_AT[role, layout]
        if shape[at] != hidden:
            continue
        other = shape[3 - at]
        if role == "gate_up_proj":
            if other % 2:  # gate and up are stacked, so this dimension is 2I
                continue
            other //= 2
        readings[layout] = other
    if readings:
        return readings
    if hidden not in shape[1:]:
        raise CheckpointError(
            f"{name} {shape}: neither inner dimension equals the hidden size {hidden}; "
            "not a fused expert tensor of this model"
        )
    raise CheckpointError(
        f"{name} {shape}: the dimension beside the hidden size {hidden} is odd, "
        "so it cannot hold gate and up stacked (2 x the expert intermediate size)"
    )


def detect_expert_layout(reader, hidden: int) -> str:
    """How the checkpoint stores MoE experts: PER_EXPERT, FUSED_HUB or FUSED_OUT_IN.

    Decided from all fused tensors together: each allows the layouts its shape fits, and the
    layout is what every tensor allows. A square tensor alone (e.g. gate_up with hidden == 2I, as
    in transformers' own tiny MoE tester configs) fits both, but its down_proj, or any other
    layer's, usually tells. Raises CheckpointError when the tensors contradict each other, when
    gate_up's 2I and down's I disagree within a layer, or when every tensor is square."""
    fused: list[tuple[str, str, str, tuple[int, ...], dict[str, int]]] = []
    for key in sorted(reader.keys()):
        match = _FUSED.match(key)
        if match:
            shape = tuple(reader.shape(key))
            role = match.group(2)
            fused.append((key, match.group(1), role, shape, _readings(key, role, shape, hidden)))
    if not fused:
        return PER_EXPERT

    allowed = {FUSED_HUB, FUSED_OUT_IN}
    witness: tuple[str, tuple[int, ...]] | None = None  # the tensor that narrowed `allowed`
    for key, _, _, shape, readings in fused:
        narrowed = allowed & readings.keys()
        if not narrowed:
            assert witness is not None  # only a tensor fitting one layout can leave one allowed
            (was,) = allowed
            (now,) = readings
            raise CheckpointError(
                f"fused expert tensors mix inner orders: {witness[0]} {witness[1]} is in {_ORDER[was]} "
                f"but {key} {shape} is in {_ORDER[now]} (hidden size {hidden}); cannot convert"
            )
        if narrowed != allowed:
            allowed, witness = narrowed, (key, shape)

    # Every remaining layout reads the same I from each tensor (a square tensor implies
    # I = hidden / 2 or hidden either way), so any one of them checks the layers.
    layout = min(allowed)
    layers: dict[str, dict[str, tuple[str, tuple[int, ...], int]]] = {}
    for key, prefix, role, shape, readings in fused:
        layers.setdefault(prefix, {})[role] = (key, shape, readings[layout])
    for roles in layers.values():
        gated = "gate_up_proj" in roles
        up = roles.get("gate_up_proj") or roles.get("up_proj")
        if up is not None and "down_proj" in roles:
            (gu, gu_shape, gu_inter), (dn, dn_shape, dn_inter) = up, roles["down_proj"]
            if gu_inter != dn_inter:
                said = f"2I = {2 * gu_inter}" if gated else f"I = {gu_inter}"
                raise CheckpointError(
                    f"{gu} {gu_shape} and {dn} {dn_shape} disagree on the expert intermediate size: "
                    f"{said} but I = {dn_inter} (hidden size {hidden})"
                )

    if len(allowed) > 1:
        key, _, _, shape, _ = fused[0]
        raise CheckpointError(
            f"the inner order of fused experts is ambiguous: {key} {shape} fits both "
            f"{_ORDER[FUSED_HUB]} and {_ORDER[FUSED_OUT_IN]} with hidden size {hidden}, and so does "
            "every other fused expert tensor; convert them to per-expert tensors first"
        )
    return layout


class ExpertSplitReader:
    """A reader whose fused expert tensors appear as per-expert tensors (read lazily)."""

    def __init__(self, reader, layout: str) -> None:
        self.reader, self.layout = reader, layout
        self._virtual: dict[str, tuple[str, int, str]] = {}
        for key in reader.keys():
            match = _FUSED.match(key)
            if match:
                experts = reader.shape(key)[0]
                projs = {"gate_up_proj": ("gate_proj", "up_proj")}.get(match.group(2), (match.group(2),))
                for e in range(experts):
                    for proj in projs:
                        self._virtual[f"{match.group(1)}.{e}.{proj}.weight"] = (key, e, proj)
        self._cache: tuple[tuple[str, bool], torch.Tensor] | None = None

    def keys(self) -> list[str]:
        real = [k for k in self.reader.keys() if not _FUSED.match(k)]
        return sorted(real + list(self._virtual))

    def __contains__(self, name: object) -> bool:
        return name in self._virtual or (name in self.reader and not _FUSED.match(str(name)))

    def _fused(self, key: str, copy: bool) -> torch.Tensor:
        if self._cache is None or self._cache[0] != (key, copy):
            t = self.reader.get(key, copy)
            self._cache = ((key, copy), t if self.layout == FUSED_OUT_IN else t.transpose(1, 2))
        return self._cache[1]  # [E, out, in], like a Linear weight per expert

    def _split(self, name: str, copy: bool) -> torch.Tensor:
        key, e, proj = self._virtual[name]
        w = self._fused(key, copy)[e]
        if not key.endswith(".gate_up_proj"):
            return w.contiguous()
        gate, up = w.chunk(2, dim=0)
        return (gate if proj == "gate_proj" else up).contiguous()

    def get(self, name: str, copy: bool = True) -> torch.Tensor:
        return self._split(name, copy) if name in self._virtual else self.reader.get(name, copy)

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._virtual:
            return self.reader.shape(name)
        key, _, proj = self._virtual[name]
        e_, a, b = self.reader.shape(key)
        out, inp = (b, a) if self.layout == FUSED_HUB else (a, b)
        return (out // 2, inp) if key.endswith(".gate_up_proj") else (out, inp)

    def dtype(self, name: str) -> torch.dtype:
        return self.reader.dtype(self._virtual[name][0] if name in self._virtual else name)

    def span(self, name: str):
        """File bytes of a tensor; an expert's are its whole fused tensor's (read once for all)."""
        return self.reader.span(self._virtual[name][0] if name in self._virtual else name)

    def __getattr__(self, name: str):
        return getattr(self.reader, name)


class ExpertFusingWriter:
    """Passes tensors through, except per-expert tensors, which it stacks into fused ones
    (``gated=False``: experts have ``up_proj`` and ``down_proj`` only, fused as ``up_proj``)."""

    def __init__(self, writer, layout: str, num_experts: int, gated: bool = True) -> None:
        self.writer, self.layout, self.num_experts = writer, layout, num_experts
        self.gated = gated
        self._parts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        match = _SPLIT.match(name) if self.layout != PER_EXPERT else None
        if not match:
            self.writer.add(name, tensor)
            return
        prefix, e, proj = match.group(1), int(match.group(2)), match.group(3)
        fused = "gate_up_proj" if self.gated and proj != "down_proj" else proj
        parts = self._parts.setdefault((prefix, fused), {})
        parts[(e, proj)] = tensor
        need = self.num_experts * (2 if fused == "gate_up_proj" else 1)
        if len(parts) == need:
            del self._parts[(prefix, fused)]
            if fused != "gate_up_proj":
                stack = torch.stack([parts[(i, proj)] for i in range(self.num_experts)])
            else:
                stack = torch.stack([torch.cat([parts[(i, "gate_proj")], parts[(i, "up_proj")]])
                                     for i in range(self.num_experts)])
            if self.layout == FUSED_HUB:
                stack = stack.transpose(1, 2)
            self.writer.add(f"{prefix}.{fused}", stack.contiguous())

    def finalize(self) -> dict[str, str]:
        assert not self._parts, f"incomplete fused experts: {sorted(self._parts)[:3]}"
        return self.writer.finalize()
