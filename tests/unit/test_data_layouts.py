"""Data files shaped as real datasets ship them (ShareGPT/LLaVA, TRL, Arrow exports, OpenAI items,
Windows encodings, data URIs) are read into the schema, or refused with one line naming the file."""

from __future__ import annotations

import base64
import io
import json
import re

import pytest

from vlm_bridge.data.encode import SampleEncoder
from vlm_bridge.data.media import load_image
from vlm_bridge.data.sources import load_source
from vlm_bridge.testing.media import make_image
from vlm_bridge.testing.tiny_qwen2_5_vl import make_tiny_processor


@pytest.fixture(scope="module")
def encoder():
    return SampleEncoder(make_tiny_processor(), max_seq_len=1024)


def _write(path, rows, bom=False):
    lines = path.suffix.lower() == ".jsonl"
    text = "".join(json.dumps(r) + "\n" for r in rows) if lines else json.dumps(rows)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    return path


def _media(sample):
    return [(i["type"], i.get(i["type"])) for m in sample["messages"] if isinstance(m["content"], list)
            for i in m["content"] if i["type"] != "text"]


def test_sharegpt_and_llava_rows_become_conversations(tmp_path, encoder):
    make_image(28, 28, seed=0).save(tmp_path / "a.png")
    make_image(28, 28, seed=1).save(tmp_path / "b.png")
    rows = [{"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                                  {"from": "gpt", "value": "A square."}]},
            {"images": ["a.png", "b.png"], "conversations": [  # no placeholder: the files open the turn
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "Compare them please"},
                {"from": "gpt", "value": "Same."}]}]
    # rows of datasets concatenated from both layouts carry the other key as null
    rows.append({**rows[0], "messages": None})
    first, second, third = load_source(f"jsonl:{_write(tmp_path / 'sharegpt.jsonl', rows)}")
    assert third["messages"] == first["messages"]
    assert [m["role"] for m in first["messages"]] == ["user", "assistant"]
    assert first["messages"][0]["content"][1] == {"type": "text", "text": "What is it?"}
    assert _media(first) == [("image", str(tmp_path / "a.png"))]
    assert [i["type"] for i in second["messages"][1]["content"]] == ["image", "image", "text"]
    assert _media(second) == [("image", str(tmp_path / "a.png")), ("image", str(tmp_path / "b.png"))]
    assert encoder.encode(first) is not None and encoder.encode(second) is not None


def test_trl_arrow_and_alias_layouts(tmp_path, encoder):
    make_image(28, 28, seed=0).save(tmp_path / "a.png")
    user_asks = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}
    answer = {"role": "assistant", "content": [{"type": "text", "text": "Red.", "image": None}]}
    rows = [
        {"messages": [user_asks, answer], "images": ["a.png"]},  # TRL
        # Arrow export of a text-only row: the null image key must not become an image
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi?", "image": None}]}, answer]},
        {"messages": [{"role": "user", "content": [{"type": "image", "path": "a.png"}]}, answer]},
        {"messages": [{"role": "user", "content": [{"type": "image", "url": f"file://{tmp_path / 'a.png'}"}]},
                      answer]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "a.png"}}]},
                      answer]},
    ]
    samples = list(load_source(f"jsonl:{_write(tmp_path / 'mixed.JSONL', rows)}"))
    assert [len(_media(s)) for s in samples] == [1, 0, 1, 1, 1]
    assert samples[1]["messages"][0]["content"] == [{"type": "text", "text": "Hi?"}]
    for sample in samples:
        encoded = encoder.encode(sample)
        assert encoded is not None
    image_token = encoder.media_token_ids["image"]
    assert int((encoder.encode(samples[1]).input_ids == image_token).sum()) == 0


def test_windows_bom_and_json_errors_name_the_file(tmp_path):
    row = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Yes."}]}
    assert len(list(load_source(f"jsonl:{_write(tmp_path / 'bom.jsonl', [row], bom=True)}"))) == 1
    assert len(list(load_source(f"json:{_write(tmp_path / 'bom.json', [row], bom=True)}"))) == 1
    (tmp_path / "comma.json").write_text(json.dumps([row])[:-1] + ",]")
    with pytest.raises(ValueError, match=r"^comma.json: invalid JSON \(Expecting value at line 1"):
        list(load_source(f"json:{tmp_path / 'comma.json'}"))


def test_media_references_data_uri_file_url_home_and_web(tmp_path, monkeypatch):
    buffer = io.BytesIO()
    make_image(30, 20, seed=0).save(buffer, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    assert load_image(uri).size == (30, 20)
    monkeypatch.setenv("HOME", str(tmp_path))
    make_image(28, 28, seed=0).save(tmp_path / "h.png")
    assert load_image("~/h.png").size == (28, 28) and load_image(f"file://{tmp_path}/h.png").size == (28, 28)
    with pytest.raises(ValueError, match="is a web address; media are not downloaded"):
        load_image("https://example.com/cat.png")
    with pytest.raises(ValueError) as bad:
        load_image("data:image/png;base64," + "A" * 5000 + "!")
    assert len(str(bad.value)) < 300 and "5023 characters" in str(bad.value)
    # a data URI inside a data file is not taken for a path relative to the file
    row = {"messages": [{"role": "user", "content": [{"type": "image", "image": uri}]},
                        {"role": "assistant", "content": "Red."}]}
    (sample,) = load_source(f"jsonl:{_write(tmp_path / 'uri.jsonl', [row])}")
    assert _media(sample) == [("image", uri)]


@pytest.mark.parametrize("row, needle", [
    ({"image": "a.png", "conversations": [{"from": "human", "value": "<image> and <image>?"},
                                          {"from": "gpt", "value": "Two."}]},
     "sg.jsonl line 1: 2 <image> placeholders but 1 image file(s)"),
    # a placeholder for one of two files: where the other goes is not said
    ({"images": ["a.png", "b.png"], "conversations": [{"from": "human", "value": "Compare <image> please"},
                                                      {"from": "gpt", "value": "Same."}]},
     "sg.jsonl line 1: 1 <image> placeholders but 2 image file(s)"),
    ({"conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt"}]},
     "sg.jsonl line 1: conversation turn 1 has no 'value'"),
    ({"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}],
      "conversations": [{"from": "human", "value": "Bye?"}, {"from": "gpt", "value": "Bye."}]},
     "sg.jsonl line 1: has both 'messages' and 'conversations'; keep one"),
])
def test_sharegpt_rows_that_do_not_add_up_are_named(tmp_path, row, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        list(load_source(f"jsonl:{_write(tmp_path / 'sg.jsonl', [row])}"))


def test_image_lists_longer_than_the_image_items_are_placed_or_refused(tmp_path):
    """A TRL-style ``images`` list: files beyond the image items fill ``<image>`` written in text
    (LLaVA data as messages), or open the first user turn when the messages ask for none; never
    dropped in silence."""
    for name in ("a.png", "b.png"):
        make_image(28, 28, seed=0).save(tmp_path / name)
    answer = {"role": "assistant", "content": [{"type": "text", "text": "Red."}]}
    rows = [
        # the messages ask for no image: the file opens the first user turn
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "Describe it."}]}, answer],
         "images": ["a.png"]},
        # LLaVA text placeholders in messages
        {"messages": [{"role": "user", "content": [{"type": "text",
                                                   "text": "<image>\nLeft, <image> right?"}]}, answer],
         "images": ["a.png", "b.png"]},
        # as many files as items: a literal "<image>" in text stays text
        {"messages": [{"role": "user", "content": [{"type": "image"},
                                                   {"type": "text", "text": "Is <image> a tag?"}]}, answer],
         "images": ["a.png"]},
    ]
    # plain-string turns (which the schema takes) place their files the same way
    rows += [{"messages": [{"role": "user", "content": "<image>What colour?"}, {"role": "assistant",
                                                                               "content": "Red."}],
              "images": ["a.png"]},
             {"messages": [{"role": "user", "content": "What colour?"}, answer], "images": ["a.png"]}]
    first, llava, literal, string_placeholder, string_plain = load_source(
        f"jsonl:{_write(tmp_path / 'trl.jsonl', rows)}")
    for sample in (string_placeholder, string_plain):
        assert sample["messages"][0]["content"] == [{"type": "image", "image": str(tmp_path / "a.png")},
                                                    {"type": "text", "text": "What colour?"}]
    assert [item["type"] for item in first["messages"][0]["content"]] == ["image", "text"]
    assert [(i["type"], i.get("image", i.get("text"))) for i in llava["messages"][0]["content"]] == [
        ("image", str(tmp_path / "a.png")), ("text", "Left, "), ("image", str(tmp_path / "b.png")),
        ("text", " right?")]
    assert literal["messages"][0]["content"][1] == {"type": "text", "text": "Is <image> a tag?"}
    asks_one = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}]}
    two_files_one_item = {"messages": [asks_one, answer], "images": ["a.png", "b.png"]}
    with pytest.raises(ValueError, match=re.escape("line 1: 2 file(s) in 'images' but 1 image item(s) or "
                                                   "<image> placeholder(s) in the messages")):
        list(load_source(f"jsonl:{_write(tmp_path / 'bad.jsonl', [two_files_one_item])}"))
    no_user_turn = {"messages": [{"role": "system", "content": "Be brief."}, answer], "images": ["a.png"]}
    with pytest.raises(ValueError, match=re.escape("line 1: 1 file(s) in its media lists, and no user turn")):
        list(load_source(f"jsonl:{_write(tmp_path / 'bad.jsonl', [no_user_turn])}"))


def test_a_top_level_system_field_becomes_the_system_turn(tmp_path):
    """LLaMA-Factory's and ms-swift's rows carry the system prompt beside the turns; dropping it
    would train the template's default system prompt instead."""
    make_image(28, 28, seed=0).save(tmp_path / "a.png")
    turns = [{"from": "human", "value": "<image>What?"}, {"from": "gpt", "value": "Red."}]
    sharegpt = {"system": "Be brief.", "images": ["a.png"], "conversations": turns}
    messages = {"system": "Be brief.", "messages": [{"role": "user", "content": "Hi?"},
                                                    {"role": "assistant", "content": "Hello."}]}
    empty = {"system": "", "messages": [{"role": "user", "content": "Hi?"},
                                        {"role": "assistant", "content": "Hello."}]}
    rows = list(load_source(f"jsonl:{_write(tmp_path / 'sys.jsonl', [sharegpt, messages, empty])}"))
    for sample in rows[:2]:
        assert sample["messages"][0] == {"role": "system", "content": "Be brief."}
        assert "system" not in sample
    assert [m["role"] for m in rows[2]["messages"]] == ["user", "assistant"]
    both = {"system": "Be brief.",
            "messages": [{"role": "system", "content": "Be long."}, *messages["messages"]]}
    with pytest.raises(ValueError, match=re.escape("line 1: has a 'system' field and a system turn")):
        list(load_source(f"jsonl:{_write(tmp_path / 'bad.jsonl', [both])}"))


@pytest.mark.parametrize("row, needle", [
    # the images list was lost: the tag would train as text about an image never seen
    ({"messages": [{"role": "user", "content": "<image>What?"}, {"role": "assistant", "content": "a"}]},
     "line 1: 1 <image> placeholder(s) in the messages but no file in 'images'"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "<image>What?"}]},
                   {"role": "assistant", "content": "a"}], "images": []},
     "line 1: 1 <image> placeholder(s) in the messages but no file in 'images'"),
    ({"messages": [{"role": "user", "content": "<image><image>What?"}, {"role": "assistant", "content": "a"}],
      "images": ["a.png"]},
     "line 1: 2 image item(s) or <image> placeholder(s) in the messages but 1 file(s) in 'images'"),
    ({"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "image"}]},
                   {"role": "assistant", "content": "a"}], "images": ["a.png"]},
     "line 1: 2 image item(s) or <image> placeholder(s) in the messages but 1 file(s) in 'images'"),
])
def test_placeholders_without_their_files_are_named(tmp_path, row, needle):
    make_image(28, 28, seed=0).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match=re.escape(needle)):
        list(load_source(f"jsonl:{_write(tmp_path / 'tags.jsonl', [row])}"))


def test_a_tag_in_an_answer_is_text():
    """Only a user turn asks for media; an answer about HTML's <video> element is text."""
    from vlm_bridge.data.layouts import normalize_sample

    row = {"messages": [{"role": "user", "content": "How do I embed a clip?"},
                        {"role": "assistant", "content": "Use the <video> element."}]}
    assert normalize_sample(row)["messages"][1]["content"] == "Use the <video> element."


def test_image_files_written_as_datasets_dicts_are_read(tmp_path, encoder):
    """``Dataset.to_json`` writes an Image column as ``{"bytes": null, "path": ...}``."""
    make_image(28, 28, seed=0).save(tmp_path / "a.png")
    file, answer = {"bytes": None, "path": "a.png"}, {"role": "assistant", "content": "Red."}
    rows = [{"messages": [{"role": "user", "content": "<image>What?"}, answer], "images": [file]},
            {"messages": [{"role": "user", "content": [{"type": "image", "image": file},
                                                       {"type": "text", "text": "What?"}]}, answer]}]
    for sample in load_source(f"jsonl:{_write(tmp_path / 'dicts.jsonl', rows)}"):
        assert _media(sample) == [("image", str(tmp_path / "a.png"))]
        assert encoder.encode(sample) is not None


def test_a_base64_image_without_a_data_uri_prefix_fails_as_that_image(tmp_path, encoder):
    """Raw base64 is no file name (it runs past the name limit): the row loads and its image fails
    as an unreadable image, which data.skip_bad_media skips, not the whole data file."""
    raw = base64.b64encode(b"x" * 3000).decode()
    row = {"messages": [{"role": "user", "content": "<image>What?"}, {"role": "assistant", "content": "A."}],
           "images": [raw]}
    (sample,) = load_source(f"jsonl:{_write(tmp_path / 'b64.jsonl', [row])}")
    with pytest.raises(ValueError, match="cannot read image"):
        encoder.encode(sample)
