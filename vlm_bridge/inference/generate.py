"""The generation loop on a Megatron-Core model: prefill once, then one token per step from the cache.

Runs on every rank of a TP x PP (x EP) layout through the same pipeline schedule as verify, so any
layout that loads also generates. Prompts of different lengths share a batch through left padding:
padding keys carry segment id -1 in the structural mask and every row appends at the same column.

Positions: the prefill uses the family's own ``position_ids`` (e.g. 3-D MRoPE with the vision
spans); each decoded token takes its row's last position plus one on every axis, which is HF's
rule (for MRoPE it is the "rope delta" after the vision spans).

Only the last position's logits are produced (``last_only``), and only on the last pipeline stage;
the chosen tokens travel from there to every rank, so every rank feeds the same next input.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from vlm_bridge.attention.mask import AttentionMask
from vlm_bridge.families._common.fused import eager_fusions
from vlm_bridge.inference.graphs import make_decoder
from vlm_bridge.inference.state import InferenceState
from vlm_bridge.parallel import cpu_group, device
from vlm_bridge.runtime import last_stage_rank, on_device, pipeline_forward_logits


@dataclass
class Sampling:
    """How the next token is chosen: greedy when ``temperature`` is 0 (the default)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.temperature < math.inf:  # nan fails too
            raise ValueError(f"--temperature must be a finite number >= 0, got {self.temperature}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"--seed must be in [0, 2**63), got {self.seed}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"--top-k must be >= 0, got {self.top_k}")


@dataclass
class Generated:
    """Generated token ids per row (stop token excluded), why each row ended, and timings."""

    tokens: list[list[int]]
    finish: list[str]  # "stop" or "length"
    prompt_tokens: int
    first_token_seconds: float = 0.0  # prefill (vision included) up to the first token
    decode_seconds: float = 0.0  # every later token
    steps: int = 0
    extra: dict = field(default_factory=dict)


def row_generators(seed: int | None, row_ids: list[int]) -> list[torch.Generator] | None:
    """One generator per row, seeded from ``seed`` and the row's request index: a request draws the
    same tokens whatever batch it shares and wherever it sits in it."""
    if seed is None:
        return None
    generators = []
    for row_id in row_ids:
        digest = hashlib.blake2b(f"{seed}/{row_id}".encode(), digest_size=8).digest()
        generators.append(torch.Generator(device=device()).manual_seed(int.from_bytes(digest) >> 1))
    return generators


def choose_tokens(logits: torch.Tensor, sampling: Sampling,
                  generator: torch.Generator | list[torch.Generator] | None) -> torch.Tensor:
    """Next token per row from ``[b, vocab]`` logits: argmax, or a draw after temperature, top-k
    and top-p (nucleus) filtering. ``generator`` is one for the batch or one per row."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    scores = logits.float() / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(scores, min(sampling.top_k, scores.shape[-1]), dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampling.top_p < 1:
        ordered, order = scores.sort(dim=-1, descending=True)
        cumulative = ordered.softmax(-1).cumsum(-1)
        # Drop a token when the ones before it already hold top_p (the first always stays).
        drop = (cumulative - ordered.softmax(-1)) >= sampling.top_p
        scores = scores.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
    probs = scores.softmax(-1)
    if isinstance(generator, list):
        return torch.cat([torch.multinomial(row[None], 1, generator=g)[:, 0]
                          for row, g in zip(probs, generator, strict=True)])
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


class _TokenRelay:
    """Brings the tokens chosen on the last pipeline stage to every rank (CPU tensors over gloo)."""

    def __init__(self) -> None:
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.source = last_stage_rank() if self.world > 1 else 0

    def share(self, tokens: torch.Tensor | None, rows: int) -> torch.Tensor:
        if self.world == 1:
            return tokens.cpu()
        buffer = tokens.cpu() if dist.get_rank() == self.source else torch.empty(rows, dtype=torch.long)
        dist.broadcast(buffer, self.source, group=cpu_group())
        return buffer


def generate_tokens(built, batch: dict, sampling: Sampling,
                    on_step: Callable[[list[list[int]]], None] | None = None,
                    trace: bool = False, decode: str = "auto", row_ids: list[int] | None = None,
                    warn_past_positions: bool = False) -> Generated:
    """Run on every rank: generate for one left-padded batch of processor outputs.

    ``on_step(tokens_so_far)`` is called on every rank after each step (streaming). ``trace`` keeps
    each step's logits (last stage, CPU) and every token fed back in ``extra`` (tests compare them
    with a full forward). ``decode`` picks how the steps after the prefill run: ``auto`` (a CUDA
    graph where possible), ``eager`` or ``static`` (see :func:`make_decoder`). ``row_ids`` (the
    rows' request indices, default 0..b-1) seed each row's own draws when ``sampling.seed`` is set.
    ``warn_past_positions``: rank 0 names (on stderr) each row whose decoding would run past the
    model's positions.
    """
    sampling.validate()
    family, settings, model = built.family, built.settings, built.model
    model.eval()
    inputs = family.model_inputs(settings, dict(batch))
    rows, prompt_len = inputs["input_ids"].shape
    padding = batch.get("attention_mask")
    valid = padding.bool() if padding is not None else torch.ones(rows, prompt_len, dtype=torch.bool)
    segments = AttentionMask.from_padding(padding).segment_ids
    segments = segments.to(device()) if segments is not None else None
    state = InferenceState(capacity=prompt_len + sampling.max_new_tokens)
    inputs["attention_mask"] = AttentionMask(segment_ids=segments, causal=True, state=state)
    row_ids = row_ids if row_ids is not None else list(range(rows))
    if warn_past_positions and (not dist.is_initialized() or dist.get_rank() == 0):
        warn_past_positions_of(settings, inputs["position_ids"], row_ids, sampling.max_new_tokens)
    next_position = inputs["position_ids"][..., -1:].to(device()) + 1  # [b, 1] or [P, b, 1]
    generator = row_generators(sampling.seed, row_ids)
    relay = _TokenRelay()
    stops = set(sampling.stop_token_ids)
    generated = Generated([[] for _ in range(rows)], ["length"] * rows, prompt_len)
    done = torch.zeros(rows, dtype=torch.bool)
    start = time.perf_counter()
    decoder = None
    with torch.no_grad(), _eager_fusions(model):
        logits = pipeline_forward_logits(model, {**on_device(inputs), "last_only": True})
        state.start = prompt_len
        for step in range(1, sampling.max_new_tokens + 1):
            chosen = None
            if logits is not None:
                chosen = choose_tokens(logits[:, -1, : settings.vocab_size], sampling, generator)
            chosen = relay.share(chosen, rows)
            if step == 1:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                generated.first_token_seconds = time.perf_counter() - start
            if trace:
                kept = logits[:, -1, : settings.vocab_size].float().cpu() if logits is not None else None
                generated.extra.setdefault("logits", []).append(kept)
                generated.extra.setdefault("fed", []).append(chosen.clone())
            _record(generated, done, chosen, stops)
            generated.steps = step
            if on_step is not None:
                on_step(generated.tokens)
            if bool(done.all()) or step == sampling.max_new_tokens:
                break
            if decoder is None:
                decoder = make_decoder(model, state, segments, valid.to(device()), next_position, decode)
            logits = decoder.step(chosen.to(device()))
    generated.decode_seconds = time.perf_counter() - start - generated.first_token_seconds
    return generated


def warn_past_positions_of(settings, position_ids: torch.Tensor, row_ids: list[int],
                           max_new_tokens: int) -> None:
    """Name each row whose decoded tokens would take positions past the model's (HF generates on
    there too, but the model never trained at them). A prompt's last position is its last column
    (left padding); with 3-D MRoPE it is the largest axis, which for an image or a video is not
    its token count. The n-th new token takes that position + n."""
    limit = getattr(settings, "max_position_embeddings", None)
    if not limit:
        return
    last = position_ids[..., -1]  # [b] or [P, b]
    last = last.amax(dim=0) if last.dim() > 1 else last
    for row, row_id in enumerate(row_ids):
        end = int(last[row])
        if end + max_new_tokens >= limit:
            print(f"warning: request {row_id}: its prompt ends at position {end}; --max-new-tokens "
                  f"{max_new_tokens} would take it past the model's {limit} positions", file=sys.stderr)


def _record(generated: Generated, done: torch.Tensor, chosen: torch.Tensor, stops: set[int]) -> None:
    """Append each unfinished row's token, or end the row at a stop token."""
    for row in torch.nonzero(~done).flatten().tolist():
        token = int(chosen[row])
        if token in stops:
            done[row], generated.finish[row] = True, "stop"
        else:
            generated.tokens[row].append(token)


@contextlib.contextmanager
def _eager_fusions(model):
    """Megatron's fused bias-dropout-add and SwiGLU are ``torch.compile`` kernels that recompile for
    every new prompt shape (seconds each, then give up); generation runs them, and the fused norms
    and activations of the families, unfused."""
    configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}.values()
    saved = [(c, c.bias_dropout_fusion, c.bias_activation_fusion) for c in configs
             if hasattr(c, "bias_dropout_fusion")]
    for config, _, _ in saved:
        config.bias_dropout_fusion = config.bias_activation_fusion = False
    try:
        with eager_fusions():
            yield
    finally:
        for config, dropout, activation in saved:
            config.bias_dropout_fusion, config.bias_activation_fusion = dropout, activation
