"""The pure-torch Mamba-2 mixer equals transformers' NemotronHMamba2Mixer (torch path): outputs and
every gradient, dt clamp exercised, across scan chunks. Packed rows equal their samples run alone;
prefill + step equals HF's cached decoding; TP=2 (spawned gloo ranks) equals TP=1, and its checkpoint
loads at TP=1."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from vlm_bridge.families._common.mamba import MambaSettings
from vlm_bridge.parallel import run_parallel

HIDDEN, TIME_STEP_MIN = 48, 0.05
SETTINGS = MambaSettings(
    num_heads=8, head_dim=8, n_groups=2, d_state=16, d_conv=4, chunk_size=8,
    time_step_min=TIME_STEP_MIN, norm_eps=1e-5, conv_bias=True, proj_bias=False,
)
LENGTHS = (13, 9)  # two samples packed into rows of 24 with padding
ATOL = 1e-5


def _hf_config():
    from transformers import NemotronHConfig

    return NemotronHConfig(
        hidden_size=HIDDEN, layers_block_type=["linear_attention"], mamba_num_heads=8, mamba_head_dim=8,
        n_groups=2, ssm_state_size=16, conv_kernel=4, chunk_size=8, time_step_min=TIME_STEP_MIN,
        use_conv_bias=True, use_bias=False, layer_norm_epsilon=1e-5,
    )


def _random_weights(gen: torch.Generator) -> dict[str, torch.Tensor]:
    s = SETTINGS
    rows, conv = sum(s.in_proj_sizes()), sum(s.conv_sizes())
    return {
        "in_proj.weight": torch.randn(rows, HIDDEN, generator=gen) * 0.15,
        "conv1d.weight": torch.randn(conv, 1, s.d_conv, generator=gen) * 0.4,
        "conv1d.bias": torch.randn(conv, generator=gen) * 0.1,
        # softplus(dt + dt_bias) straddles TIME_STEP_MIN, so the clamp bites on some tokens.
        "dt_bias": torch.rand(s.num_heads, generator=gen) * 3.0 - 3.5,
        # A in [-2, -0.1]: slow enough decay that states carried across chunks matter.
        "A_log": math.log(0.1) + torch.rand(s.num_heads, generator=gen) * math.log(20.0),
        "D": torch.randn(s.num_heads, generator=gen),
        "norm.weight": 1.0 + 0.2 * torch.randn(s.d_inner, generator=gen),
        "out_proj.weight": torch.randn(HIDDEN, s.d_inner, generator=gen) * 0.15,
    }


def _hf_mixer(weights: dict[str, torch.Tensor]):
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMamba2Mixer

    mixer = NemotronHMamba2Mixer(_hf_config(), layer_idx=0)
    mixer.load_state_dict(weights, strict=True)
    return mixer.eval()  # eval: the torch path (no fused-kernel attempt)


def _grads(module, x: torch.Tensor, out: torch.Tensor, proj: torch.Tensor) -> dict[str, torch.Tensor]:
    (out * proj).sum().backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters()}
    return {"input": x.grad.clone(), **grads}


@pytest.fixture(scope="module")
def case() -> dict:
    """Weights, a batch ``[b, s, h]`` crossing scan chunks, and HF's outputs and gradients on it."""
    if importlib.util.find_spec("mamba_ssm"):
        pytest.skip("mamba_ssm is installed: the HF reference would not take its torch path")
    gen = torch.Generator().manual_seed(0)
    weights = _random_weights(gen)
    x = torch.randn(2, 21, HIDDEN, generator=gen)
    # Scaled so that gradients are O(1): then 1e-5 absolute means about 1e-5 relative.
    proj = torch.randn(2, 21, HIDDEN, generator=gen) * 0.02
    hf = _hf_mixer(weights)
    xg = x.clone().requires_grad_(True)
    out = hf(xg)
    return {"weights": weights, "x": x, "proj": proj, "out": out.detach(), "grads": _grads(hf, xg, out, proj)}


def _config(tp: int):
    from megatron.core.transformer.transformer_config import TransformerConfig

    from vlm_bridge.families._common.megatron_config import common_kwargs

    return TransformerConfig(num_layers=1, hidden_size=HIDDEN, num_attention_heads=4,
                             tensor_model_parallel_size=tp, **common_kwargs(torch.float32))


def _build(tp: int, weights: dict[str, torch.Tensor]):
    """Our mixer at ``tp`` (distributed already initialised) holding this rank's shard of ``weights``."""
    from megatron.core import parallel_state

    from vlm_bridge.convert.distribute import rank_piece
    from vlm_bridge.families._common.mamba import MambaMixer

    rank = parallel_state.get_tensor_model_parallel_rank()
    mixer = MambaMixer(_config(tp), SETTINGS, layer_number=1)
    parts = {"in_proj.weight": SETTINGS.in_proj_sizes(), "conv1d.weight": SETTINGS.conv_sizes(),
             "conv1d.bias": SETTINGS.conv_sizes()}
    split_dim = {"out_proj.weight": 1}
    local = {}
    for name, full in weights.items():
        if name in parts:
            local[name] = rank_piece(full, parts[name], tp, rank)
        else:
            local[name] = full.chunk(tp, dim=split_dim.get(name, 0))[rank]
    mixer.load_state_dict(local, strict=True)
    return mixer


def _run(mixer, x: torch.Tensor, proj: torch.Tensor, segment_ids=None) -> tuple:
    """Our output ``[b, s, h]`` and gradients of ``sum(out * proj)`` (input, then per parameter)."""
    mixer.zero_grad(set_to_none=True)
    xg = x.transpose(0, 1).clone().requires_grad_(True)
    out, bias = mixer(xg, segment_ids)
    assert bias is None
    grads = _grads(mixer, xg, out, proj.transpose(0, 1))
    grads["input"] = grads["input"].transpose(0, 1)
    return out.detach().transpose(0, 1), grads


def _tp1_job(weights: dict, x: torch.Tensor, proj: torch.Tensor, samples: list, sample_proj: list,
             packed_rows: list) -> dict:
    from vlm_bridge.parallel import ParallelConfig, init_distributed

    init_distributed(ParallelConfig(), seed=0)
    mixer = _build(1, weights)
    res = {"plain": _run(mixer, x, proj)}
    # Every token in one segment takes the masked (packing) code paths; they must agree.
    res["one_segment"] = _run(mixer, x, proj, torch.zeros(x.shape[:2], dtype=torch.long))

    # Packed rows vs each sample alone: same outputs, and the same gradients (each sample appears
    # once per row, so its gradients count twice).
    seg_rows, x_rows, proj_rows = [], [], []
    pad_gen = torch.Generator().manual_seed(1)
    for order in packed_rows:
        seg, xs, ps = [], [], []
        for item in order:
            if item == "pad":
                seg.append(-1)
                xs.append(5.0 * torch.randn(1, HIDDEN, generator=pad_gen))
                ps.append(torch.zeros(1, HIDDEN))  # padding outputs are never used
            else:
                seg += [max(seg, default=-1) + 1] * len(samples[item])
                xs.append(samples[item])
                ps.append(sample_proj[item])
        seg_rows.append(torch.tensor(seg))
        x_rows.append(torch.cat(xs))
        proj_rows.append(torch.cat(ps))
    segment_ids = torch.stack(seg_rows)
    res["packed"] = _run(mixer, torch.stack(x_rows), torch.stack(proj_rows), segment_ids) + (segment_ids,)
    mixer.zero_grad(set_to_none=True)
    alone_out, alone_dx = [], []
    for sample, p in zip(samples, sample_proj):
        xg = sample[:, None].clone().requires_grad_(True)
        out, _ = mixer(xg)
        (2 * out[:, 0] * p).sum().backward()
        alone_out.append(out.detach()[:, 0])
        alone_dx.append(xg.grad[:, 0] / 2)
    alone_params = {n: p.grad.clone() for n, p in mixer.named_parameters()}
    res["alone"] = (alone_out, alone_dx, alone_params)

    # Generation: prefill 13 tokens, then step through the rest one at a time.
    with torch.no_grad():
        full, _ = mixer(x.transpose(0, 1))
        first, conv_state, ssm_state = mixer.prefill(x[:, :13].transpose(0, 1))
        outs = [first]
        for t in range(13, x.shape[1]):
            out, conv_state, ssm_state = mixer.step(x[:, t : t + 1].transpose(0, 1), conv_state, ssm_state)
            outs.append(out)
    res["generate"] = (full, torch.cat(outs))
    return res


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _assert_close(ours: dict, ref: dict, what: str) -> None:
    assert ours.keys() == ref.keys(), what
    for name in ref:
        diff = _max_diff(ours[name], ref[name])
        assert diff <= ATOL, f"{what}: {name} differs by {diff:.2e}"


def test_data_exercises_the_dt_clamp(case):
    from vlm_bridge.families.nemotron_vl.config import mamba_settings

    assert mamba_settings(_hf_config()) == SETTINGS
    w = case["weights"]
    dt = case["x"] @ w["in_proj.weight"][-SETTINGS.num_heads:].T + w["dt_bias"]
    clamped = int((torch.nn.functional.softplus(dt) < TIME_STEP_MIN).sum())
    assert 0.1 * dt.numel() < clamped < 0.9 * dt.numel(), f"{clamped} of {dt.numel()} dt values clamped"


def test_tp1_matches_hf_packed_and_generation(case):
    gen = torch.Generator().manual_seed(2)
    samples = [torch.randn(n, HIDDEN, generator=gen) for n in LENGTHS]
    sample_proj = [torch.randn(n, HIDDEN, generator=gen) * 0.02 for n in LENGTHS]
    rows = [[0, "pad", 1, "pad"], [1, 0, "pad", "pad"]]  # padding between samples and at the end
    res = run_parallel(_tp1_job, 1, case["weights"], case["x"], case["proj"], samples, sample_proj, rows)

    out, grads = res["plain"]
    assert _max_diff(out, case["out"]) <= ATOL
    _assert_close(grads, case["grads"], "TP=1 vs HF gradients")
    assert _max_diff(res["one_segment"][0], out) <= ATOL
    _assert_close(res["one_segment"][1], grads, "one segment vs unpacked")

    packed_out, packed_grads, segment_ids = res["packed"]
    alone_out, alone_dx, alone_params = res["alone"]
    for row, order in enumerate(rows):
        for seg, item in enumerate(i for i in order if i != "pad"):
            where = segment_ids[row] == seg
            assert _max_diff(packed_out[row][where], alone_out[item]) <= ATOL
            assert _max_diff(packed_grads["input"][row][where], alone_dx[item]) <= ATOL
        assert packed_grads["input"][row][segment_ids[row] < 0].abs().max() == 0  # padding: no effect
    _assert_close({n: g for n, g in packed_grads.items() if n != "input"}, alone_params, "packed vs alone")

    full, stepped = res["generate"]
    assert _max_diff(full[:13], stepped[:13]) <= ATOL  # the prefill is a full forward
    # Decoding steps follow HF's own cached decoding, which leaves out the time_step_min floor of
    # its chunked scan (so neither equals a full forward here, where the floor bites).
    assert _max_diff(stepped, _hf_cached_decode(case["weights"], case["x"], 13)) <= ATOL
    assert _max_diff(full, stepped) > 1e-3


def _hf_cached_decode(weights: dict, x: torch.Tensor, prefill: int) -> torch.Tensor:
    """HF's mixer: ``prefill`` tokens through its chunked scan, then one token at a time from its cache."""
    from transformers import DynamicCache

    mixer, cache = _hf_mixer(weights), DynamicCache(config=_hf_config())
    with torch.no_grad():
        outs = [mixer(x[:, :prefill], cache=cache)]
        outs += [mixer(x[:, t : t + 1], cache=cache) for t in range(prefill, x.shape[1])]
    return torch.cat(outs, dim=1).transpose(0, 1)


def _tp2_job(weights: dict, x: torch.Tensor, proj: torch.Tensor, ref_out: torch.Tensor, ref_grads: dict,
             ckpt_dir: str) -> dict:
    import torch.distributed as dist
    from megatron.core import dist_checkpointing, parallel_state

    from vlm_bridge.convert.distribute import rank_piece
    from vlm_bridge.parallel import ParallelConfig, init_distributed

    init_distributed(ParallelConfig(tp=2), seed=0)
    rank = parallel_state.get_tensor_model_parallel_rank()
    mixer = _build(2, weights)
    out, grads = _run(mixer, x, proj)
    diffs = {"output": _max_diff(out, ref_out), "input": _max_diff(grads.pop("input"), ref_grads["input"])}
    for name, local in grads.items():
        full = ref_grads[name]
        if name.startswith(("in_proj", "conv1d")):
            full = rank_piece(full, SETTINGS.in_proj_sizes() if "in_proj" in name else SETTINGS.conv_sizes(),
                              2, rank)
        else:
            full = full.chunk(2, dim=1 if name == "out_proj.weight" else 0)[rank]
        diffs[name] = _max_diff(local, full)
    seg = torch.tensor([[0] * 10 + [1] * 11, [0] * 21])
    packed_out, _ = mixer(x.transpose(0, 1), seg)
    diffs["packed_rank_spread"] = _max_diff(packed_out, _from_rank0(packed_out))
    dist_checkpointing.save(mixer.sharded_state_dict(prefix="mixer."), ckpt_dir)
    worst = torch.tensor(list(diffs.values()))
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return dict(zip(diffs, worst.tolist())) | {"packed": packed_out.transpose(0, 1).detach()}


def _from_rank0(t: torch.Tensor) -> torch.Tensor:
    """Rank 0's copy of ``t`` on every rank: outputs replicated over TP must agree exactly."""
    import torch.distributed as dist

    t = t.detach().clone()
    dist.broadcast(t, src=0)
    return t


def _load_job(ckpt_dir: str, weights: dict, x: torch.Tensor) -> dict:
    from megatron.core import dist_checkpointing

    from vlm_bridge.parallel import ParallelConfig, init_distributed

    init_distributed(ParallelConfig(), seed=0)
    mixer = _build(1, {n: torch.zeros_like(w) for n, w in weights.items()})
    loaded = dist_checkpointing.load(mixer.sharded_state_dict(prefix="mixer."), ckpt_dir)
    mixer.load_state_dict({k.removeprefix("mixer."): v for k, v in loaded.items()}, strict=True)
    diffs = {n: _max_diff(p.detach(), weights[n]) for n, p in mixer.named_parameters()}
    seg = torch.tensor([[0] * 10 + [1] * 11, [0] * 21])
    return {"diffs": diffs, "packed": mixer(x.transpose(0, 1), seg)[0].transpose(0, 1).detach()}


@pytest.mark.slow
def test_tp2_matches_tp1_and_checkpoint_reshards(case, tmp_path):
    (tmp_path / "ckpt").mkdir()
    ckpt = str(tmp_path / "ckpt")
    res = run_parallel(_tp2_job, 2, case["weights"], case["x"], case["proj"], case["out"], case["grads"],
                       ckpt)
    packed = res.pop("packed")
    assert res["packed_rank_spread"] == 0
    for name, diff in res.items():
        assert diff <= ATOL, f"TP=2 vs HF (which TP=1 matches): {name} differs by {diff:.2e}"
    loaded = run_parallel(_load_job, 1, ckpt, case["weights"], case["x"])
    assert max(loaded["diffs"].values()) == 0, loaded["diffs"]
    assert _max_diff(loaded["packed"], packed) <= ATOL


def test_tp_must_divide_heads_and_groups():
    from vlm_bridge.families._common.mamba import MambaMixer

    with pytest.raises(ValueError, match=r"^--tp 4 does not divide the Mamba groups \(2\)$"):
        MambaMixer(_config(4), SETTINGS)


def _frozen_strides_job(weights: dict, x: torch.Tensor) -> dict:
    from vlm_bridge.parallel import ParallelConfig, init_distributed

    init_distributed(ParallelConfig(), seed=0)
    mixer = _build(1, weights)
    for linear in (mixer.in_proj, mixer.out_proj):  # frozen, as under LoRA
        linear.weight.requires_grad_(False)
    seen: dict[str, tuple] = {}

    def on_grad(g: torch.Tensor) -> None:
        seen.setdefault("in_proj grad_output", (g.shape, g.stride()))

    def on_in_proj(module, args, output):
        output[0].register_hook(on_grad)

    mixer.in_proj.register_forward_hook(on_in_proj)
    def on_out_proj(module, args):  # returns None: the inputs go on unchanged
        seen.setdefault("out_proj input", (args[0].shape, args[0].stride()))

    mixer.out_proj.register_forward_pre_hook(on_out_proj)
    xg = x[:1].transpose(0, 1).clone().requires_grad_(True)  # one row: [s, 1, h]
    out, _ = mixer(xg)
    out.sum().backward()
    return seen


def test_frozen_projections_see_row_major_tensors(case):
    """A one-row batch still hands the frozen projections row-major tensors (forward input of
    ``out_proj``, gradient into ``in_proj``): transposed views there made the GPU run each as a
    batched matmul with the weight broadcast over positions."""
    seen = run_parallel(_frozen_strides_job, 1, case["weights"], case["x"])
    assert set(seen) == {"in_proj grad_output", "out_proj input"}
    for what, (shape, stride) in seen.items():
        assert stride == torch.empty(shape).stride(), f"{what}: strides {stride} for shape {tuple(shape)}"
