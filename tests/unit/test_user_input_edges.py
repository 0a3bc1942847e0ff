"""Inputs shaped as real users' are: what outside testing found the commands mishandled."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file


def test_video_frames_of_different_sizes_name_the_frame(tmp_path):
    from vlm_bridge.data.media import load_video

    frames = tmp_path / "frames"
    frames.mkdir()
    Image.new("RGB", (32, 24)).save(frames / "000.png")
    Image.new("RGB", (32, 24)).save(frames / "001.png")
    Image.new("RGB", (16, 24)).save(frames / "002.png")
    with pytest.raises(ValueError, match=r"002\.png is 16x24 but .*000\.png is 32x24"):
        load_video(frames, processor=None)
    (frames / "002.png").unlink()
    assert len(load_video(frames, processor=None).frames) == 2


def test_an_empty_prompt_asks_about_the_media_alone(tmp_path):
    from vlm_bridge.inference.requests import request_from_args

    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    content = request_from_args("", [str(image)], None).messages[0]["content"]
    assert [item["type"] for item in content] == ["image"]
    with pytest.raises(ValueError, match="--prompt is empty and no --image or --video"):
        request_from_args("", [], None)


def test_image_tags_in_a_prompt_place_the_images(tmp_path):
    """LLaVA users write ``<image>`` where the picture goes; the tag is not left as text."""
    from vlm_bridge.inference.requests import request_from_args

    a, b = str(tmp_path / "a.png"), str(tmp_path / "b.png")

    def items(prompt, images, video=None):
        content = request_from_args(prompt, images, video).messages[0]["content"]
        return [(i["type"], i.get(i["type"])) for i in content]

    assert items("Left <image>, right <image>?", [a, b]) == [
        ("text", "Left "), ("image", a), ("text", ", right "), ("image", b), ("text", "?")]
    assert items("What?", [a], "clip.mp4") == [("image", a), ("video", "clip.mp4"), ("text", "What?")]
    with pytest.raises(ValueError, match=re.escape("--prompt: 2 image item(s) or <image> placeholder(s)")):
        request_from_args("<image><image>?", [a], None)
    # with no media given a tag is text: a question about HTML, say
    assert items("What does <video> do?", []) == [("text", "What does <video> do?")]


def test_a_failing_user_metric_is_a_usage_error_naming_it():
    from vlm_bridge.inference.evaluate import score_answers

    with pytest.raises(ValueError, match="--metric os:getcwd failed on answer 'a'"):
        score_answers(["a"], [["a"]], ("exact_match", "os:getcwd"))


def test_processor_failure_on_media_names_the_request(tmp_path):
    from vlm_bridge.inference.requests import build_prompt_batch, request_from_args

    class ThinImageProcessor:  # as an image processor whose patch grid divides by zero
        tokenizer = type("Tokenizer", (), {"pad_token": "<pad>"})()

        def apply_chat_template(self, messages, **kwargs):
            return "prompt"

        def __call__(self, **kwargs):
            raise ZeroDivisionError("division by zero")

    image = tmp_path / "wide.png"
    Image.new("RGB", (2000, 20)).save(image)
    with pytest.raises(ValueError, match=r"^--prompt: the processor rejected the media .*wide\.png "
                                         r"\(ZeroDivisionError"):
        build_prompt_batch(ThinImageProcessor(), [request_from_args("hi", [str(image)], None)])


def test_stop_tokens_without_a_generation_config_come_from_config_json(tiny_hf, tmp_path):
    from transformers import AutoTokenizer

    from vlm_bridge.inference.command import stop_token_ids

    folder = tmp_path / "hf"
    shutil.copytree(tiny_hf, folder)
    (folder / "generation_config.json").unlink()
    config = json.loads((folder / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    eos = sorted({tokenizer.eos_token_id, 3, 5})
    config["eos_token_id"] = config["text_config"]["eos_token_id"] = eos
    (folder / "config.json").write_text(json.dumps(config))
    assert sorted(stop_token_ids(folder, tokenizer)) == eos


def test_checkpoint_dtype_is_the_one_holding_most_bytes(tmp_path):
    from vlm_bridge.convert.hf_io import SafetensorsReader
    from vlm_bridge.loading import checkpoint_dtype

    save_file({"a.norm": torch.ones(4), "b.weight": torch.ones(64, 64, dtype=torch.bfloat16),
               "c.ids": torch.arange(10_000)}, str(Path(tmp_path) / "model.safetensors"))
    with SafetensorsReader(tmp_path) as reader:  # first by name is fp32; integers never count
        assert checkpoint_dtype(reader) == torch.bfloat16


def test_a_stored_copy_of_a_tied_output_layer_round_trips_and_a_different_one_is_refused(
        tiny_hf_tied, run_cli, capsys, tmp_path):
    from safetensors.torch import load_file

    from vlm_bridge.testing.checks import checkpoint_mismatches

    hf = tmp_path / "hf"
    shutil.copytree(tiny_hf_tied, hf)
    tensors = load_file(hf / "model.safetensors")
    embedding = next(key for key in tensors if key.endswith("embed_tokens.weight"))
    save_file({**tensors, "lm_head.weight": tensors[embedding].clone()}, str(hf / "model.safetensors"),
              metadata={"format": "pt"})
    assert run_cli("import", "--hf-model", hf, "--megatron-path", tmp_path / "meg") == 0
    assert run_cli("export", "--megatron-path", tmp_path / "meg", "--hf-path", tmp_path / "out") == 0
    assert checkpoint_mismatches(hf, tmp_path / "out") == []  # lm_head.weight included, bit for bit
    assert "lm_head.weight" in load_file(tmp_path / "out" / "model.safetensors")

    save_file({**tensors, "lm_head.weight": tensors[embedding] + 1}, str(hf / "model.safetensors"),
              metadata={"format": "pt"})
    capsys.readouterr()
    assert run_cli("import", "--hf-model", hf, "--megatron-path", tmp_path / "meg2") == 2
    err = capsys.readouterr().err
    assert "lm_head.weight differs from" in err and "tie_word_embeddings" in err


def test_processor_options_are_checked_by_name_and_value(tiny_hf, tmp_path):
    from vlm_bridge.inference.requests import build_prompt_batch, request_from_args
    from vlm_bridge.loading import load_processor

    processor = load_processor(tiny_hf)
    image = tmp_path / "a.png"
    Image.new("RGB", (64, 48)).save(image)
    requests = [request_from_args("hi", [str(image)], None)]
    with pytest.raises(ValueError, match="--processor-arg do_resise: not an option of"):
        build_prompt_batch(processor, requests, do_resise=False)  # a typo transformers would ignore
    with pytest.raises(ValueError, match=r"--processor-arg .*do_resize.*rejected it \(.*expected bool"):
        build_prompt_batch(processor, requests, do_resize="maybe")
    assert build_prompt_batch(processor, requests, do_resize=True)["input_ids"].shape[0] == 1


def test_a_metric_module_in_the_current_folder_is_found(tmp_path, monkeypatch):
    import sys

    from vlm_bridge.inference.metrics import check_metric

    (tmp_path / "folder_metrics.py").write_text("def half(answer, references):\n    return 0.5\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    assert check_metric("folder_metrics:half")("a", ["b"]) == 0.5
    assert str(tmp_path) not in sys.path  # the search path is left as it was


def test_frames_reach_a_video_processor_that_does_not_sample(tmp_path):
    """A hub folder without a video config gets a video processor that takes frames as given;
    frames from a folder then still carry the indices it reads their times from."""
    from vlm_bridge.inference.requests import build_prompt_batch, request_from_args
    from vlm_bridge.loading import load_processor
    from vlm_bridge.testing.media import make_video_frames
    from vlm_bridge.testing.tiny_qwen3_vl import build_tiny_qwen3_vl

    processor = load_processor(build_tiny_qwen3_vl(tmp_path / "qwen3"))
    processor.video_processor.do_sample_frames = False
    frames = tmp_path / "frames"
    frames.mkdir()
    for i, frame in enumerate(make_video_frames(4, 64, 64, seed=1)):
        frame.save(frames / f"{i:03d}.png")
    batch = build_prompt_batch(processor, [request_from_args("What moves?", [], str(frames))])
    assert batch["video_grid_thw"][0, 0] == 2  # four frames, two temporal patches


def test_a_run_folder_leads_to_checkpoints_kept_elsewhere(tmp_path):
    import json

    from vlm_bridge.inference.command import resolve_megatron_path

    saves = tmp_path / "fast_disk" / "ckpts"
    (saves / "iter_0000002" / "weights").mkdir(parents=True)
    (saves / "iter_0000002" / "vlm_bridge.json").write_text("{}")
    (saves / "latest").write_text("2\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"checkpoint": {"dir": str(saves)}}))
    assert resolve_megatron_path(run) == saves / "iter_0000002"


def test_a_phone_photo_is_turned_upright_as_transformers_turns_it(tmp_path):
    """EXIF orientation 6: landscape pixels shown rotated; transformers' load_image honours it, so
    training, evaluation and generation must too (else they see another image than serving)."""
    from transformers.image_utils import load_image as hf_load_image

    from vlm_bridge.data.media import load_image

    pixels = Image.new("RGB", (224, 112), (200, 30, 30))
    pixels.paste((20, 20, 220), (0, 0, 40, 112))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    path = tmp_path / "photo.jpg"
    pixels.save(path, exif=exif)
    ours, theirs = load_image(str(path)), hf_load_image(str(path))
    assert ours.size == theirs.size == (112, 224)
    assert list(ours.getdata()) == list(theirs.getdata())
    with Image.open(path) as opened:  # a PIL image given as it was decoded (a datasets column)
        assert list(load_image(opened).getdata()) == list(theirs.getdata())


def test_a_folder_without_a_tokenizer_imports_with_a_note_and_is_refused_by_name(tiny_hf, run_cli, capfd,
                                                                                 tmp_path):
    """transformers builds an empty tokenizer for a folder of weights and configs only: every text
    encoded to nothing, and generate ended in an internal error."""
    hf = tmp_path / "no_tokenizer"
    shutil.copytree(tiny_hf, hf)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (hf / name).unlink()
    assert run_cli("import", "--hf-model", hf, "--megatron-path", tmp_path / "meg") == 0
    assert "note: " in capfd.readouterr().out
    needle = "no tokenizer (tokenizer.json / tokenizer_config.json missing)"
    for source in (["--hf-model", hf], ["--megatron-path", tmp_path / "meg"]):
        assert run_cli("generate", *source, "--prompt", "hi", "--max-new-tokens", "2") == 2
        assert needle in capfd.readouterr().err


def test_hub_ids_and_cache_entries_resolve_to_the_snapshot_refs_main_names(tiny_hf, tmp_path, monkeypatch):
    """A model as users name it: ``org/name`` from the local cache, or the cache entry folder, whose
    refs/main may name an older snapshot than the newest one on disk. Nothing is downloaded."""
    import huggingface_hub.constants

    from vlm_bridge.convert.hf_io import CheckpointError
    from vlm_bridge.loading import resolve_model_folder

    cache = tmp_path / "hub"
    entry = cache / "models--tiny-org--tiny-q25"
    main, newer = entry / "snapshots" / ("a" * 40), entry / "snapshots" / ("f" * 40)
    shutil.copytree(tiny_hf, main)
    newer.mkdir(parents=True)
    (newer / "config.json").write_text("{}")  # a partial download of a later revision
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    assert resolve_model_folder(str(entry)) == str(main)
    assert Path(resolve_model_folder("tiny-org/tiny-q25")).resolve() == main.resolve()
    assert resolve_model_folder(str(tiny_hf)) == str(tiny_hf)
    with pytest.raises(CheckpointError, match="tiny-org/other: no such folder, and not in the local "
                                              "Hugging Face cache"):
        resolve_model_folder("tiny-org/other")
    # refs/main naming a snapshot that is not there: no other revision is taken in its place
    (entry / "refs" / "main").write_text("b" * 40)
    from vlm_bridge.loading import load_hf_config

    with pytest.raises(CheckpointError, match="refs/main names no complete snapshot"):
        load_hf_config(resolve_model_folder(str(entry)))
    with pytest.raises(CheckpointError, match=re.escape("tiny-org/tiny-q25: its cache entry ") + ".*"
                       + re.escape("has no refs/main naming a complete snapshot; pass a snapshot folder")):
        resolve_model_folder("tiny-org/tiny-q25")
