"""Sampling is reproducible with a seed; top-k 1 and a tiny top-p reduce to greedy; stop tokens and
max-new-tokens end rows as they should; ``vlm-bridge generate`` answers prompts and JSONL files and
refuses bad input with one line."""

from __future__ import annotations

import json

import pytest

from vlm_bridge.inference.generate import Sampling, choose_tokens
from vlm_bridge.inference.requests import request_from_args
from vlm_bridge.parallel import run_parallel
from vlm_bridge.testing.generation import batch_size_runs, sampling_runs


def test_sampling_seeds_filters_stops_and_lengths(tiny_hf):
    requests = [request_from_args("Name a colour.", [], None), request_from_args("Hi.", [], None)]
    greedy = Sampling(max_new_tokens=8)
    samplings = [
        greedy,
        Sampling(max_new_tokens=8, temperature=1.0, seed=7),
        Sampling(max_new_tokens=8, temperature=1.0, seed=7),
        Sampling(max_new_tokens=8, temperature=1.0, seed=8),
        Sampling(max_new_tokens=8, temperature=0.7, top_k=1, seed=3),
        Sampling(max_new_tokens=8, temperature=1.3, top_p=1e-6, seed=3),
        Sampling(max_new_tokens=3),
    ]
    out = run_parallel(sampling_runs, 1, str(tiny_hf), requests, samplings)
    (g, g_finish), seven, seven_again, eight, top_k1, top_p0, short = out["runs"]
    assert all(len(row) == 8 for row in g) and g_finish == ["length", "length"]
    assert seven == seven_again  # same seed, same draw
    assert seven[0] != eight[0] or seven[1] != eight[1]  # another seed, another draw
    assert seven[0] != g  # sampling at temperature 1 left greedy's path on this model
    assert top_k1[0] == g and top_p0[0] == g
    assert short[0] == [row[:3] for row in g] and short[1] == ["length", "length"]
    tokens, finish = out["stopped"]
    cut = g[0].index(out["stop"])
    assert tokens[0] == g[0][:cut] and finish[0] == "stop"


def test_seeded_sampling_does_not_depend_on_the_batch(tiny_hf):
    prompts = ["Name a colour.", "Hi.", "Count to three, please, slowly."]
    requests = [request_from_args(p, [], None) for p in prompts]
    sampling = Sampling(max_new_tokens=6, temperature=1.0, seed=11)
    answers = run_parallel(batch_size_runs, 1, str(tiny_hf), requests, sampling, [1, 2, 3])
    assert answers[1] == answers[2] == answers[3]
    assert len(set(answers[1])) > 1  # the rows drew different tokens


def test_a_request_running_past_the_positions_is_named(capsys):
    import torch

    from vlm_bridge.inference.generate import warn_past_positions_of

    class Settings:
        max_position_embeddings = 16

    # left-padded 1-D positions: request 5's prompt ends at 5, request 4's at 3
    flat = torch.tensor([[0, 0, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5]])
    warn_past_positions_of(Settings(), flat, [4, 5], max_new_tokens=11)
    # 3-D MRoPE: an image of 8 tokens spans only 2 positions, so 8 tokens end at position 3
    mrope = torch.tensor([[[0, 1, 1, 1, 1, 1, 1, 1, 1, 3]], [[0, 1, 1, 1, 1, 2, 2, 2, 2, 3]],
                          [[0, 1, 2, 1, 2, 1, 2, 1, 2, 3]]])
    warn_past_positions_of(Settings(), mrope, [0], max_new_tokens=12)
    warn_past_positions_of(Settings(), mrope, [0], max_new_tokens=13)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["warning: request 5: its prompt ends at position 5; --max-new-tokens 11 would take "
                   "it past the model's 16 positions",
                   "warning: request 0: its prompt ends at position 3; --max-new-tokens 13 would take "
                   "it past the model's 16 positions"]


def test_top_p_keeps_the_smallest_set_reaching_p():
    import torch

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draws = {int(choose_tokens(logits, Sampling(temperature=1.0, top_p=0.7), g))
             for g in (torch.Generator().manual_seed(s) for s in range(200))}
    assert draws == {0, 1}  # 0.5 alone is under 0.7; 0.5 + 0.3 reaches it


def test_generate_cli_prompt_and_jsonl(run_cli, tiny_megatron, tmp_path, capfd):
    from vlm_bridge.testing.media import make_image

    image = tmp_path / "cat.png"
    make_image(96, 64, seed=4).save(image)
    assert run_cli("generate", "--megatron-path", tiny_megatron, "--prompt", "What is this?",
                   "--image", image, "--max-new-tokens", "4") == 0
    rows = [{"messages": [{"role": "user", "content": [{"type": "image", "image": "cat.png"},
                                                        {"type": "text", "text": "Colour?"}]},
                          {"role": "assistant", "content": "red"}]},
            {"messages": [{"role": "user", "content": "Say hi."}]}]
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    answers = tmp_path / "a.jsonl"
    assert run_cli("generate", "--megatron-path", tiny_megatron, "--input", questions, "--output", answers,
                   "--max-new-tokens", "5", "--batch-size", "2") == 0
    written = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [w["index"] for w in written] == [0, 1]
    assert written[0]["reference"] == "red" and written[1]["reference"] is None
    assert all(w["tokens"] <= 5 and w["finish"] in ("stop", "length") for w in written)
    assert "answered 2 prompts" in capfd.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--prompt", "x", "--input", "q.jsonl"], "exactly one of --prompt and --input"),
    (["--prompt", "x", "--image", "missing.png"], "missing.png does not exist"),
    (["--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--prompt", "x", "--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--input", "bad.jsonl"], "bad.jsonl"),
])
def test_generate_cli_refuses_bad_input(run_cli, tiny_megatron, tmp_path, monkeypatch, capfd, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.jsonl").write_text('{"messages": [{"role": "robot", "content": "x"}]}\n')
    assert run_cli("generate", "--megatron-path", tiny_megatron, *args) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_generate_cli_refuses_a_folder_that_is_no_checkpoint(run_cli, tmp_path, capfd):
    assert run_cli("generate", "--megatron-path", tmp_path, "--prompt", "x") == 2
    assert "not a vlm-bridge Megatron checkpoint" in capfd.readouterr().err


def test_generate_cli_refuses_a_video_for_an_image_only_family(run_cli, tmp_path, capfd):
    from vlm_bridge.testing.tiny_gemma3_vl import build_tiny_gemma3_vl

    gemma = build_tiny_gemma3_vl(tmp_path / "gemma")
    (tmp_path / "clip").mkdir()
    capfd.readouterr()
    assert run_cli("generate", "--hf-model", gemma, "--prompt", "x", "--video", tmp_path / "clip") == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "gemma3_vl family takes no video input" in err[0], err


SAMPLING_CONFIG = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20,
                   "repetition_penalty": 1.05}


@pytest.mark.parametrize("config, options, expected, noted", [
    ({}, {}, {"max_new_tokens": 128, "temperature": 0.0, "top_p": 1.0, "top_k": 0}, []),
    ({"max_new_tokens": 3, "do_sample": False, "temperature": 0.7}, {},
     {"max_new_tokens": 3, "temperature": 0.0, "top_p": 1.0, "top_k": 0}, []),
    (SAMPLING_CONFIG, {}, {"max_new_tokens": 128, "temperature": 0.7, "top_p": 0.8, "top_k": 20},
     ["sampling with temperature 0.7, top-p 0.8, top-k 20 (temperature, top-p, top-k from",
      "repetition_penalty 1.05 not applied"]),
    # one option given: the others still come from the config, as transformers takes them
    (SAMPLING_CONFIG, {"top_k": 5}, {"max_new_tokens": 128, "temperature": 0.7, "top_p": 0.8, "top_k": 5},
     ["top-k 5 (temperature, top-p from", "repetition_penalty 1.05 not applied"]),
    (SAMPLING_CONFIG, {"temperature": 0.0}, {"max_new_tokens": 128, "temperature": 0.0, "top_p": 0.8,
                                             "top_k": 20}, ["repetition_penalty 1.05 not applied"]),
    # a greedy config and --top-k alone: greedy, and said
    ({"do_sample": False}, {"top_k": 5},
     {"max_new_tokens": 128, "temperature": 0.0, "top_p": 1.0, "top_k": 5},
     ["--top-p and --top-k apply only when sampling"]),
])
def test_unset_generate_options_come_from_the_generation_config(tmp_path, capsys, config, options, expected,
                                                                noted):
    """As transformers' generate reads generation_config.json (Gemma 3's samples with top-k 64 and
    top-p 0.95); what is not applied is named."""
    from types import SimpleNamespace

    from vlm_bridge.cli import _sampling

    if config:
        (tmp_path / "generation_config.json").write_text(json.dumps(config))
    args = SimpleNamespace(**{"max_new_tokens": None, "temperature": None, "top_p": None, "top_k": None,
                              **options}, seed=None, batch_size=1)
    sampling = _sampling(args, str(tmp_path))
    assert {k: getattr(sampling, k) for k in expected} == expected
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: ")]
    assert len(notes) == len(noted) and all(n in note for n, note in zip(noted, notes)), notes
