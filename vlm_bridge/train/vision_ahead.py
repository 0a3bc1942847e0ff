"""A frozen vision tower encodes the media of all of a step's micro-batches in one pass.

With every tower parameter frozen (LoRA's default, or ``freeze.vision``), the features need no
gradient, so nothing ties their computation to their micro-batch. Encoded per micro-batch, the
tower launches its dozen kernels per layer once per micro-batch on a few thousand patches each,
and a slow host cannot keep up: a 7B model's LoRA step (7 LM layers, 5 micro-batches) took
661 ms for 505 ms of kernels on one H100, the GPU's waits launched from the tower's ops. Here the
step's media go through the tower together, before the schedule runs, and each micro-batch's
forward takes its rows of the result.

Every family encodes through ``VLMModel.encode_vision``, whose inputs are items (each tensor's
rows per image or video: the contract context parallelism deals items out by). A first pass runs
each micro-batch's ``embed`` without gradients while ``encode_vision`` records its calls and
answers zeros; the calls of one tower are concatenated item-wise and encoded at once; the
micro-batch forwards then get the recorded calls' rows back, in order. Numerically this is the
same tower over the same items; only the GEMMs' shapes differ. Off under context parallelism
(its ranks deal the items out themselves), where any tower parameter trains, for a single
micro-batch, for a step whose media reach the tower other than through ``encode_vision`` (the
recording stops at the first such call, before the tower runs), and under
``VLM_BRIDGE_ENCODE_AHEAD=0``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


def _identity(encode: Callable) -> tuple:
    """The same tower whatever object stands for it (a bound method is a new object per access)."""
    return (id(getattr(encode, "__self__", None)), getattr(encode, "__func__", encode))


@dataclass
class _Call:
    encode: Callable
    inputs: list[torch.Tensor]
    out_rows: list[int]
    out_shape: tuple[int, ...]
    outputs: int
    result: Any = field(default=None, repr=False)

    def group_key(self) -> tuple:
        """Calls that can share one encoding: one tower, inputs of the same trailing shapes."""
        return (_identity(self.encode), self.outputs, self.out_shape,
                tuple((t.shape[1:], t.dtype, t.device) for t in self.inputs))


class EncodedAhead:
    """What ``VLMModel.encode_vision`` defers to while set on the model: it records calls (and
    answers zeros) until :meth:`encode_all`, then hands each recorded call's features back."""

    def __init__(self) -> None:
        self.calls: list[_Call] = []
        self.recording = True
        self.replayed = 0

    def __call__(self, encode: Callable, inputs: Sequence[tuple[torch.Tensor, Sequence[int]]],
                 out_rows: Sequence[int], out_shape: tuple[int, ...], outputs: int, dtype: torch.dtype):
        if self.recording:
            call = _Call(encode, [t for t, _ in inputs], list(out_rows), tuple(out_shape), outputs)
            self.calls.append(call)
            device = call.inputs[0].device
            zeros = torch.zeros((sum(call.out_rows), *call.out_shape), dtype=dtype, device=device)
            return zeros if outputs == 1 else (zeros, [zeros] * (outputs - 1))
        if self.replayed >= len(self.calls):
            raise RuntimeError("a micro-batch encoded more media than the step recorded")
        call = self.calls[self.replayed]
        if _identity(call.encode) != _identity(encode) or call.out_rows != list(out_rows):
            raise RuntimeError("a micro-batch's media differ from those the step recorded for it")
        self.replayed += 1
        result, call.result = call.result, None  # the forward holds it from here
        return result

    def encode_all(self) -> None:
        """Encode the recorded calls, one tower call per group of compatible calls."""
        groups: dict[tuple, list[_Call]] = {}
        for call in self.calls:
            groups.setdefault(call.group_key(), []).append(call)
        for calls in groups.values():
            first = calls[0]
            with torch.no_grad():
                merged = [torch.cat([c.inputs[j] for c in calls]) for j in range(len(first.inputs))]
                out = first.encode(*merged)
            outs = [out] if first.outputs == 1 else [out[0], *out[1]]
            pieces = [o.split([sum(c.out_rows) for c in calls]) for o in outs]
            for i, call in enumerate(calls):
                parts = [p[i] for p in pieces]
                call.result = parts[0] if call.outputs == 1 else (parts[0], parts[1:])
                call.inputs = []
        self.recording = False


def applies(vlm: torch.nn.Module, micro_batches: int) -> bool:
    """A frozen tower on this stage, no context parallelism, several micro-batches."""
    from vlm_bridge.attention.context import context_parallel_size

    tower = getattr(vlm, "vision", None)
    return (os.environ.get("VLM_BRIDGE_ENCODE_AHEAD", "1") != "0" and micro_batches > 1
            and hasattr(vlm, "encode_vision") and getattr(vlm, "pre_process", False) and tower is not None
            and context_parallel_size() == 1 and not any(p.requires_grad for p in tower.parameters()))


@contextlib.contextmanager
def vision_encoded_ahead(model: torch.nn.Module, inputs: Sequence[dict]) -> Iterator[bool]:
    """Within the block, the forwards of micro-batches with these ``inputs`` (in this order) take
    their vision features from one encoding of all of them; yields whether it applies."""
    from vlm_bridge.parallel import unwrap_model

    vlm = unwrap_model(model)
    if not applies(vlm, len(inputs)):
        yield False
        return
    ahead = EncodedAhead()
    vlm._encoded_ahead = ahead
    try:
        if _record(vlm, inputs):
            ahead.encode_all()
        else:  # some media reach the tower other than through encode_vision: per micro-batch
            vlm._encoded_ahead = None
        yield vlm._encoded_ahead is not None
    finally:
        vlm._encoded_ahead = None


class _TowerCalledDirectly(Exception):
    pass


def _record(vlm: torch.nn.Module, inputs: Sequence[dict]) -> bool:
    """Each micro-batch's ``embed`` without gradients, its tower calls recorded; False (and the
    tower not run) where a family calls the tower itself instead of through ``encode_vision``."""

    def refuse(*args, **kwargs):
        raise _TowerCalledDirectly

    tower = vlm.vision
    tower.forward = refuse  # the instance's, for the recording only
    try:
        with torch.no_grad():
            for batch in inputs:
                vlm.embed(batch["input_ids"], **vlm.media_inputs(batch))
        return True
    except _TowerCalledDirectly:
        return False
    finally:
        del tower.forward
