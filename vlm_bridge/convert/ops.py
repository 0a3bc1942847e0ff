"""The closed set of invertible weight operations that family tables are built from.

Each op turns the HF tensors of one table entry into the one full (unsharded) Megatron tensor and
back. ``to_hf(to_megatron(x)) == x`` bit-exactly for every op: they only move, concatenate, slice
or zero-pad data. ``tp_chunks`` tells the generic sharding step that the Megatron tensor is a
concatenation of that many equal parts (or of parts of the sizes it lists) which are each split
across TP ranks (Megatron's fused gate/up, Mamba's fused input projection).

QKV layout: HF keeps ``q`` (heads * d), ``k`` and ``v`` (groups * d) apart or concatenated in that
order; Megatron's ``linear_qkv`` interleaves them per query group,
``[q_g0 (heads/groups * d), k_g0 (d), v_g0 (d), q_g1, ...]``, so that a contiguous TP split keeps
whole groups on each rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class Op:
    """Base: one HF tensor <-> one Megatron tensor, unchanged."""

    arity = 1
    tp_chunks = 1
    # The Megatron tensor is its HF tensors stacked along dim 0, unchanged: conversion can then
    # hand either side's tensors over as row slabs of the other's without concatenating them.
    stacks_rows = False

    def to_megatron(self, hf: list[torch.Tensor]) -> torch.Tensor:
        return hf[0]

    def to_hf(self, t: torch.Tensor) -> list[torch.Tensor]:
        return [t]


class Rename(Op):
    """Same data, different name."""


@dataclass
class FuseQKV(Op):
    """q, k, v (or one HF-fused ``[q; k; v]`` tensor) <-> Megatron's per-group interleaved QKV."""

    heads: int
    groups: int
    head_dim: int
    hf_fused: bool = False

    @property
    def arity(self) -> int:  # type: ignore[override]
        return 1 if self.hf_fused else 3

    def _sizes(self) -> tuple[int, int]:
        return self.heads * self.head_dim, self.groups * self.head_dim

    def to_megatron(self, hf: list[torch.Tensor]) -> torch.Tensor:
        q_size, kv_size = self._sizes()
        q, k, v = hf[0].split([q_size, kv_size, kv_size]) if self.hf_fused else hf
        rest = q.shape[1:]
        per = self.heads // self.groups
        q = q.reshape(self.groups, per * self.head_dim, *rest)
        k = k.reshape(self.groups, self.head_dim, *rest)
        v = v.reshape(self.groups, self.head_dim, *rest)
        return torch.cat([q, k, v], dim=1).reshape(-1, *rest)

    def to_hf(self, t: torch.Tensor) -> list[torch.Tensor]:
        per = self.heads // self.groups
        rest = t.shape[1:]
        grouped = t.reshape(self.groups, (per + 2) * self.head_dim, *rest)
        q, k, v = grouped.split([per * self.head_dim, self.head_dim, self.head_dim], dim=1)
        q, k, v = (x.reshape(-1, *rest) for x in (q, k, v))
        return [torch.cat([q, k, v])] if self.hf_fused else [q, k, v]


@dataclass
class ConcatRows(Op):
    """Several HF tensors stacked along dim 0 (gate and up -> Megatron's GLU ``linear_fc1``)."""

    parts: int = 2
    stacks_rows = True

    @property
    def arity(self) -> int:  # type: ignore[override]
        return self.parts

    @property
    def tp_chunks(self) -> int:  # type: ignore[override]
        return self.parts

    def to_megatron(self, hf: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(hf, dim=0)

    def to_hf(self, t: torch.Tensor) -> list[torch.Tensor]:
        # Views: the safetensors writer copies each tensor's bytes out as it comes, and a copy here
        # would hold a second full-size tensor during a streaming export.
        return list(t.chunk(self.parts, dim=0))


@dataclass
class Parts(Op):
    """One HF tensor that is a concatenation of parts of different sizes along dim 0, each split
    across TP on its own (Mamba's ``in_proj`` rows ``[z, x, B, C, dt]``, its conv channels
    ``[x, B, C]``); the data is unchanged."""

    sizes: tuple[int, ...]

    @property
    def tp_chunks(self) -> tuple[int, ...]:  # type: ignore[override]
        return self.sizes


@dataclass
class PadRows(Op):
    """Zero-pad dim 0 (vocabulary rows) to the size Megatron allocates; slice back on export."""

    rows: int
    padded_rows: int

    def to_megatron(self, hf: list[torch.Tensor]) -> torch.Tensor:
        t = hf[0]
        if t.shape[0] != self.rows:
            raise ValueError(f"expected {self.rows} rows, found shape {tuple(t.shape)}")
        pad = t.new_zeros(self.padded_rows - self.rows, *t.shape[1:])
        return torch.cat([t, pad])

    def to_hf(self, t: torch.Tensor) -> list[torch.Tensor]:
        return [t[: self.rows]]  # a view, as in ConcatRows


@dataclass
class PadDim(ConcatRows):
    """Each of ``parts`` HF tensors zero-padded along ``dim`` from ``size`` to ``padded`` (and, for
    several parts, stacked along dim 0 like :class:`ConcatRows`): an FFN whose width TP does not
    divide gets zero rows in ``linear_fc1`` (gate and up each) and zero columns in ``linear_fc2``,
    which change no output (act(0) = 0 for GELU/SiLU, and a zero column adds nothing); export slices
    them off."""

    parts: int = 1
    size: int = 0
    padded: int = 0
    dim: int = 0
    stacks_rows = False  # zero padding in between

    def to_megatron(self, hf: list[torch.Tensor]) -> torch.Tensor:
        padded = []
        for t in hf:
            if t.shape[self.dim] != self.size:
                raise ValueError(f"expected {self.size} along dim {self.dim}, found shape {tuple(t.shape)}")
            shape = list(t.shape)
            shape[self.dim] = self.padded - self.size
            padded.append(torch.cat([t, t.new_zeros(shape)], dim=self.dim))
        return super().to_megatron(padded)

    def to_hf(self, t: torch.Tensor) -> list[torch.Tensor]:
        return [x.narrow(self.dim, 0, self.size).clone() for x in super().to_hf(t)]


@dataclass
class Transpose(Op):
    """A 2-D tensor stored ``[in, out]`` by HF where Megatron keeps a Linear's ``[out, in]``."""

    def to_megatron(self, hf: list[torch.Tensor]) -> torch.Tensor:
        return hf[0].t().contiguous()

    def to_hf(self, t: torch.Tensor) -> list[torch.Tensor]:
        return [t.t().contiguous()]


@dataclass(frozen=True)
class Entry:
    """One row of a weight table: a full Megatron parameter and the HF tensors it is made of."""

    megatron: str
    hf: tuple[str, ...]
    op: Op
    # Kept in fp32 whatever the checkpoint's dtype, on disk and in the model (HF's
    # ``_keep_in_fp32_modules``, e.g. a router gate that must not round to bf16).
    fp32: bool = False

    def __post_init__(self) -> None:
        assert len(self.hf) == self.op.arity, f"{self.megatron}: {len(self.hf)} HF names for {self.op}"
