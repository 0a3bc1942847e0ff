"""Decoding steps after the prefill: eager, or replayed from one captured CUDA graph.

A decoding step of a 7B model launches hundreds of small kernels from Python; on a GPU the host
cannot keep up, so a step costs several times the weight reads it needs. Capturing the step once
and replaying it removes that: every input lives in a static tensor (token ids, positions, the
write position and key mask of the static :class:`~vlm_bridge.inference.state.InferenceState`),
updated in place before each replay, and the step's logits land in a static output.

Graphs need one stage (PP=1: the pipeline schedule runs on the host) and no host synchronisation
inside the step, which MoE token dispatch has; those runs decode eagerly. ``VLM_BRIDGE_CUDA_GRAPHS=0``
forces eager decoding.
"""

from __future__ import annotations

import os
import warnings

import torch
from megatron.core import parallel_state

from vlm_bridge.attention.mask import AttentionMask
from vlm_bridge.runtime import pipeline_forward_logits


class EagerDecoder:
    """One token per call through the pipeline schedule (any TP/PP/EP, CPU and GPU)."""

    def __init__(self, model, state, segments: torch.Tensor | None, next_position: torch.Tensor) -> None:
        self.model, self.state = model, state
        self.segments, self.position = segments, next_position

    def step(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """Logits ``[b, 1, vocab]`` after feeding ``tokens`` ``[b]`` (last stage; None elsewhere)."""
        if self.segments is not None:
            self.segments = torch.cat([self.segments, self.segments.new_zeros(len(tokens), 1)], dim=1)
        inputs = {"input_ids": tokens[:, None].to(self.position.device), "position_ids": self.position,
                  "attention_mask": AttentionMask(segment_ids=self.segments, causal=True, state=self.state),
                  "last_only": True}
        logits = pipeline_forward_logits(self.model, inputs)
        self.position = self.position + 1
        self.state.start += 1
        return logits


class GraphDecoder:
    """The same step captured once as a CUDA graph (first call) and replayed."""

    def __init__(self, model, state, valid_prompt: torch.Tensor, next_position: torch.Tensor,
                 capture: bool = True) -> None:
        self.model, self.state, self.capture = model, state, capture
        state.make_static(valid_prompt)
        self.ids = torch.zeros(valid_prompt.shape[0], 1, dtype=torch.long, device=valid_prompt.device)
        self.position = next_position.clone()
        self.inputs = {"input_ids": self.ids, "position_ids": self.position,
                       "attention_mask": AttentionMask(causal=True, state=state),
                       "last_only": True, "runtime_gather_output": True}
        self.graph: torch.cuda.CUDAGraph | bool | None = None  # False: capture failed
        self.logits: torch.Tensor | None = None

    @staticmethod
    def usable(model) -> bool:
        """One stage and no MoE (its token dispatch synchronises with the host)."""
        moe = getattr(model.language_model.config, "num_moe_experts", None)
        return parallel_state.get_pipeline_model_parallel_world_size() == 1 and not moe

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.ids.copy_(tokens[:, None])
        self.state.advance_static()
        if self.graph is None:
            self._capture() if self.capture else setattr(self, "graph", False)
        if self.graph:
            self.graph.replay()
        else:  # capture failed: the same static step, run eagerly
            self.logits = self.model(**self.inputs)
        self.position.add_(1)
        self.state.start += 1
        return self.logits

    def _capture(self) -> None:
        # Warm up on a side stream (lazy initialisation must not be captured); the warm-up step
        # writes the same keys the real step will, but advances recurrent state: put it back.
        saved = {k: tuple(t.clone() for t in v) for k, v in self.state.pieces.items() if isinstance(v, tuple)}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.model(**self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        for key, tensors in saved.items():
            for live, kept in zip(self.state.pieces[key], tensors):
                live.copy_(kept)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.logits = self.model(**self.inputs)
            self.graph = graph
        except RuntimeError as exc:  # pragma: no cover - depends on the GPU stack
            warnings.warn(f"CUDA-graph capture failed ({exc}); decoding without graphs", stacklevel=2)
            self.graph = False


def make_decoder(model, state, segments: torch.Tensor | None, valid_prompt: torch.Tensor,
                 next_position: torch.Tensor, mode: str = "auto") -> EagerDecoder | GraphDecoder:
    """``auto``: a CUDA graph where it can run, else eager; ``eager``; ``static``: the graph's
    fixed-shape step without capturing it (what a graph replays, testable on the CPU)."""
    if mode not in ("auto", "eager", "static"):
        raise ValueError(f"decode mode must be auto, eager or static, got {mode!r}")
    if os.environ.get("VLM_BRIDGE_CUDA_GRAPHS") == "0" and mode == "auto":
        mode = "eager"
    if mode != "eager" and GraphDecoder.usable(model):
        if mode == "static" or next_position.device.type == "cuda":
            return GraphDecoder(model, state, valid_prompt, next_position, capture=mode == "auto")
    return EagerDecoder(model, state, segments, next_position)
