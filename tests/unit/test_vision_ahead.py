"""The frozen tower's step-wide encoding (train/vision_ahead.py) on a stand-in model: calls of one
tower are encoded together and handed back per micro-batch in order; a step whose media reach the
tower directly falls back to per-micro-batch encoding without running the tower while recording."""

from __future__ import annotations

import torch

from vlm_bridge.train.vision_ahead import vision_encoded_ahead


class _Tower(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[int] = []

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        self.calls.append(pixels.shape[0])
        return pixels * 2


class _Model(torch.nn.Module):
    """What vision_ahead needs of ``VLMModel``: a tower, ``encode_vision``, ``embed``."""

    pre_process = True

    def __init__(self) -> None:
        super().__init__()
        self.vision = _Tower()

    def encode_vision(self, encode, inputs, out_rows, cost, out_shape, outputs=1):
        ahead = getattr(self, "_encoded_ahead", None)
        if ahead is not None:
            return ahead(encode, inputs, out_rows, out_shape, outputs, torch.float32)
        return encode(*(t for t, _ in inputs))

    def media_inputs(self, inputs: dict) -> dict:
        return {k: v for k, v in inputs.items() if k != "input_ids"}

    def embed(self, input_ids, pixels=None, direct=None):
        if pixels is not None:
            n = pixels.shape[0]
            return self.encode_vision(self.vision, [(pixels, [1] * n)], [1] * n, [1] * n, (pixels.shape[1],))
        if direct is not None:  # a family path that calls the tower itself
            return self.vision(direct)
        return None


def _batches(*media: dict) -> list[dict]:
    return [{"input_ids": torch.zeros(1, 4, dtype=torch.long), **m} for m in media]


def test_one_tower_call_for_the_step_and_each_micro_batch_gets_its_rows():
    model = _Model()
    images = [torch.arange(6.0).reshape(3, 2), torch.arange(10.0, 14.0).reshape(2, 2)]
    batches = _batches({"pixels": images[0]}, {}, {"pixels": images[1]})
    with vision_encoded_ahead(model, batches) as applied:
        assert applied and model.vision.calls == [5]  # both micro-batches' items at once
        got = [model.embed(**b) for b in batches]
    assert model.vision.calls == [5] and model._encoded_ahead is None
    torch.testing.assert_close(got[0], images[0] * 2)
    assert got[1] is None
    torch.testing.assert_close(got[2], images[1] * 2)


def test_a_tower_called_directly_leaves_the_step_per_micro_batch():
    model = _Model()
    batches = _batches({"pixels": torch.ones(2, 2)}, {"direct": torch.ones(3, 2)})
    with vision_encoded_ahead(model, batches) as applied:
        assert not applied and model.vision.calls == []  # nothing ran while recording
        model.embed(**batches[0])
        model.embed(**batches[1])
    assert model.vision.calls == [2, 3] and "forward" not in vars(model.vision)


def test_a_trainable_tower_or_a_single_micro_batch_is_left_alone():
    model = _Model()
    model.vision.weight = torch.nn.Parameter(torch.ones(1))
    one = {"pixels": torch.ones(1, 2)}
    with vision_encoded_ahead(model, _batches(one, one)) as on:
        assert not on
    model.vision.weight.requires_grad_(False)
    with vision_encoded_ahead(model, _batches(one)) as on:
        assert not on
    with vision_encoded_ahead(model, _batches(one, one)) as on:
        assert on
