"""Every table op is invertible bit-exactly and produces Megatron's layout."""

from __future__ import annotations

import pytest
import torch

from vlm_bridge.convert.ops import ConcatRows, Entry, FuseQKV, PadDim, PadRows, Rename, Transpose


def rand(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))


@pytest.mark.parametrize("heads,groups", [(4, 4), (4, 2), (8, 1)])
@pytest.mark.parametrize("bias", [False, True])
def test_fuse_qkv_layout_and_inverse(heads, groups, bias):
    d, hidden = 3, 5
    shape = (lambda n: (n,)) if bias else (lambda n: (n, hidden))
    q, k, v = rand(*shape(heads * d)), rand(*shape(groups * d)), rand(*shape(groups * d))
    op = FuseQKV(heads, groups, d)
    fused = op.to_megatron([q, k, v])
    per = heads // groups
    # Group g holds its query heads, then its key head, then its value head.
    for g in range(groups):
        block = fused[g * (per + 2) * d:(g + 1) * (per + 2) * d]
        assert torch.equal(block[: per * d], q[g * per * d:(g + 1) * per * d])
        assert torch.equal(block[per * d:(per + 1) * d], k[g * d:(g + 1) * d])
        assert torch.equal(block[(per + 1) * d:], v[g * d:(g + 1) * d])
    back = op.to_hf(fused)
    assert all(torch.equal(a, b) for a, b in zip(back, [q, k, v]))


def test_fuse_qkv_from_hf_fused():
    heads, d = 2, 4
    qkv = rand(3 * heads * d, 7)
    op = FuseQKV(heads, heads, d, hf_fused=True)
    separate = FuseQKV(heads, heads, d).to_megatron(list(qkv.split(heads * d)))
    assert torch.equal(op.to_megatron([qkv]), separate)
    assert torch.equal(op.to_hf(op.to_megatron([qkv]))[0], qkv)


def test_concat_rows_pad_rows_transpose_rename():
    gate, up = rand(6, 4), rand(6, 5)[:, :4]
    op = ConcatRows(2)
    assert op.tp_chunks == 2
    assert all(torch.equal(a, b) for a, b in zip(op.to_hf(op.to_megatron([gate, up])), [gate, up]))
    emb = rand(300, 8)
    pad = PadRows(300, 384)
    padded = pad.to_megatron([emb])
    assert padded.shape == (384, 8) and torch.equal(padded[300:], torch.zeros(84, 8))
    assert torch.equal(pad.to_hf(padded)[0], emb)
    with pytest.raises(ValueError, match="expected 300 rows"):
        pad.to_megatron([rand(299, 8)])
    w = rand(3, 7)
    assert torch.equal(Transpose().to_hf(Transpose().to_megatron([w]))[0], w)
    assert Rename().to_megatron([w]) is w


def test_entry_checks_arity():
    with pytest.raises(AssertionError):
        Entry("x", ("a", "b"), Rename())


def test_pad_dim_pads_each_part_and_inverts():
    gate, up = torch.randn(70, 8), torch.randn(70, 8)
    fc1 = PadDim(parts=2, size=70, padded=72)
    out = fc1.to_megatron([gate, up])
    assert out.shape == (144, 8) and fc1.tp_chunks == 2 and fc1.arity == 2
    assert torch.equal(out[:70], gate) and torch.equal(out[72:142], up) and not out[70:72].any()
    assert all(torch.equal(a, b) for a, b in zip(fc1.to_hf(out), [gate, up]))
    down = torch.randn(8, 70)
    fc2 = PadDim(size=70, padded=72, dim=1)
    wide = fc2.to_megatron([down])
    assert wide.shape == (8, 72) and torch.equal(fc2.to_hf(wide)[0], down)
    with pytest.raises(ValueError, match="expected 70 along dim 1"):
        fc2.to_megatron([torch.randn(8, 71)])
