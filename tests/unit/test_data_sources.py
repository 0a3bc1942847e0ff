"""Sources: JSON files with relative media, local ``datasets`` copies of each maker's dataset."""

from __future__ import annotations

import json
import re

import datasets
import pytest
from PIL import Image

from vlm_bridge.data.encode import IGNORE_INDEX, SampleEncoder
from vlm_bridge.data.sources import (
    MAKERS,
    cord_v2,
    json_to_token,
    llava_video_178k,
    load_hf_dataset,
    load_json_samples,
    load_source,
    medpix,
    raven,
)
from vlm_bridge.testing.media import make_image, make_video_frames, save_video_frames
from vlm_bridge.testing.tiny_qwen2_5_vl import make_tiny_processor


@pytest.fixture(scope="module")
def encoder():
    return SampleEncoder(make_tiny_processor(), max_seq_len=1024)


def answers(sample) -> list[str]:
    return [m["content"] for m in sample["messages"] if m["role"] == "assistant"]


def encodes(encoder, sample) -> bool:
    encoded = encoder.encode(sample)
    return encoded is not None and bool((encoded.labels != IGNORE_INDEX).any())


def test_jsonl_relative_paths(tmp_path, monkeypatch, encoder):
    data = tmp_path / "data"
    (data / "imgs").mkdir(parents=True)
    make_image(56, 84).save(data / "imgs" / "a.png")
    save_video_frames(make_video_frames(2, 56, 56), data / "clips" / "c1")
    rows = [
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image", "image": "imgs/a.png"}, {"type": "text", "text": "?"}],
                },
                {"role": "assistant", "content": "A shape."},
            ]
        },
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "video", "video": "clips/c1"}, {"type": "text", "text": "?"}],
                },
                {"role": "assistant", "content": [{"type": "text", "text": "Motion."}]},
            ]
        },
    ]
    (data / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (data / "train.json").write_text(json.dumps(rows))
    monkeypatch.chdir(tmp_path)  # paths must resolve against the file's folder, not the cwd
    for spec in ("jsonl:data/train.jsonl", "json:data/train.json"):
        samples = list(load_source(spec))
        assert samples[0]["messages"][0]["content"][0]["image"] == str(data / "imgs" / "a.png")
        assert samples[1]["messages"][0]["content"][0]["video"] == str(data / "clips" / "c1")
        monkeypatch.chdir(data / "imgs")
        assert all(encodes(encoder, s) for s in samples)
        monkeypatch.chdir(tmp_path)
    # ms-swift's convention: paths relative to where the run starts, when not beside the data file
    launched = {"messages": [{"role": "user", "content": "<image>?"}, {"role": "assistant", "content": "A."}],
                "images": ["data/imgs/a.png"]}
    (data / "cwd.jsonl").write_text(json.dumps(launched) + "\n")
    (sample,) = load_source("data/cwd.jsonl")
    assert sample["messages"][0]["content"][0]["image"] == str(data / "imgs" / "a.png")
    (data / "data" / "imgs").mkdir(parents=True)  # beside the file wins when both exist
    make_image(28, 28).save(data / "data" / "imgs" / "a.png")
    (sample,) = load_source("data/cwd.jsonl")
    assert sample["messages"][0]["content"][0]["image"] == str(data / "data" / "imgs" / "a.png")


def test_jsonl_errors_name_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}]}
    path.write_text(
        json.dumps(good) + "\n" + json.dumps({"messages": [{"role": "bot", "content": "x"}]}) + "\n"
    )
    with pytest.raises(ValueError, match=r"^bad.jsonl line 2: message 0 has role 'bot'$"):
        list(load_json_samples(path))
    with pytest.raises(ValueError, match="unknown source"):
        load_source("csv:x.csv")


def test_hf_source_with_images_column(tmp_path, encoder):
    user = [{"type": "image"}, {"type": "text", "text": "What is it?"}]
    ds = datasets.Dataset.from_dict(
        {
            "messages": [
                [
                    {"role": "user", "content": user},
                    {"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
                ]
            ],
            "images": [[make_image(56, 56)]],
        },
        features=datasets.Features(
            {
                "messages": datasets.List(
                    {
                        "role": datasets.Value("string"),
                        "content": datasets.List(
                            {"type": datasets.Value("string"), "text": datasets.Value("string")}
                        ),
                    }
                ),
                "images": datasets.List(datasets.Image()),
            }
        ),
    )
    ds.save_to_disk(tmp_path / "chat")
    (sample,) = load_source(f"hf:{tmp_path / 'chat'}")
    image_item, text_item = sample["messages"][0]["content"]
    assert isinstance(image_item["image"], Image.Image) and "text" not in image_item
    assert text_item == {"type": "text", "text": "What is it?"}
    assert encodes(encoder, sample)


def test_load_hf_dataset_from_data_files(tmp_path):
    folder = tmp_path / "parquet"
    folder.mkdir()
    datasets.Dataset.from_dict({"x": [1, 2, 3]}).to_parquet(folder / "train.parquet")
    ds = load_hf_dataset(folder, split="train", cache_dir=str(tmp_path / "cache"))
    assert ds["x"] == [1, 2, 3]
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"x": [4]})}).save_to_disk(tmp_path / "dd")
    assert load_hf_dataset(tmp_path / "dd", split="validation")["x"] == [4]
    with pytest.raises(ValueError, match="no split 'train'"):
        load_hf_dataset(tmp_path / "dd")


@pytest.mark.parametrize("name, text, needle", [
    ("empty.jsonl", "", "the file is empty"),
    ("header.csv", "a,b\n", "holds no rows"),
    ("folder/a.jsonl", "", "holds no rows (an empty data file?)"),
])
def test_a_source_of_no_rows_is_named(tmp_path, name, text, needle):
    """An export that failed part-way leaves an empty file; datasets' own words for it (a
    StopIteration, "Instruction 'train' corresponds to no data!") name no file."""
    path = tmp_path / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    spec = f"hf:{path.parent if name.startswith('folder') else path}"
    with pytest.raises(ValueError, match=re.escape(f"data source {spec[3:]}: {needle}")):
        list(load_source(spec, cache_dir=str(tmp_path / "cache")))


def test_json_to_token_matches_donut():
    parse = {
        "menu": [{"nm": "Tea", "price": "3"}, {"nm": "Cake", "price": "5"}],
        "total": {"total_price": "8"},
    }
    assert json_to_token(parse) == (
        "<s_total><s_total_price>8</s_total_price></s_total>"
        "<s_menu><s_price>3</s_price><s_nm>Tea</s_nm><sep/><s_price>5</s_price><s_nm>Cake</s_nm></s_menu>"
    )
    assert json_to_token({"text_sequence": "plain"}) == "plain"


def test_cord_v2(tmp_path, encoder):
    parse = {"menu": {"nm": "Tea", "price": "3"}, "total": {"total_price": "3"}}
    ds = datasets.Dataset.from_dict(
        {"image": [make_image(84, 112)], "ground_truth": [json.dumps({"gt_parse": parse, "meta": {}})]},
        features=datasets.Features({"image": datasets.Image(), "ground_truth": datasets.Value("string")}),
    )
    datasets.DatasetDict({"train": ds}).save_to_disk(tmp_path / "cord")
    (sample,) = load_source("cord_v2", path=str(tmp_path / "cord"))
    assert answers(sample) == [json_to_token(parse)]
    image, text = sample["messages"][0]["content"]
    assert isinstance(image["image"], Image.Image) and text["text"] == "Extract the receipt fields."
    assert list(cord_v2(path=tmp_path / "cord")) and encodes(encoder, sample)


def test_medpix_with_default_and_overridden_columns(tmp_path, encoder):
    features = datasets.Features(
        {"image": datasets.Image(), "question": datasets.Value("string"), "answer": datasets.Value("string")}
    )
    data = {"image": [make_image(56, 56)], "question": ["Which organ?"], "answer": ["The liver."]}
    datasets.Dataset.from_dict(data, features=features).save_to_disk(tmp_path / "medpix")
    (sample,) = medpix(path=tmp_path / "medpix")
    assert sample["messages"][0]["content"][1]["text"] == "Which organ?" and answers(sample) == ["The liver."]
    assert encodes(encoder, sample)

    renamed = {"img": data["image"], "case_question": data["question"], "Answer": data["answer"]}
    datasets.Dataset.from_dict(renamed).cast_column("img", datasets.Image()).save_to_disk(tmp_path / "other")
    (sample,) = medpix(path=tmp_path / "other", columns={"question": "case_question"})
    assert sample["messages"][0]["content"][1]["text"] == "Which organ?" and answers(sample) == ["The liver."]
    with pytest.raises(ValueError, match="no question column"):
        list(medpix(path=tmp_path / "other"))


def test_raven(tmp_path, encoder):
    texts = [
        {"user": "Which panel completes the pattern?", "assistant": "Answer: B", "source": "raven"},
        {"user": "Why?", "assistant": "Shapes grow.", "source": "raven"},
    ]
    ds = datasets.Dataset.from_dict(
        {"images": [[make_image(56, 56, 1), make_image(56, 84, 2)]], "texts": [texts]}
    )
    ds = ds.cast_column("images", datasets.List(datasets.Image()))
    datasets.DatasetDict({"train": ds}).save_to_disk(tmp_path / "the_cauldron" / "raven")
    (sample,) = load_source("raven", path=str(tmp_path / "the_cauldron"))
    roles = [m["role"] for m in sample["messages"]]
    assert roles == ["user", "assistant", "user", "assistant"]
    first = sample["messages"][0]["content"]
    assert [item["type"] for item in first] == ["image", "image", "text"]
    assert sample["messages"][2]["content"] == [{"type": "text", "text": "Why?"}]
    assert answers(sample) == ["Answer: B", "Shapes grow."]
    assert list(raven(path=tmp_path / "the_cauldron")) and encodes(encoder, sample)


def test_llava_video_178k_from_hub_style_data_files(tmp_path, encoder):
    """Annotations as JSON data files plus a dataset card naming config and split, as on the hub."""
    root = tmp_path / "LLaVA-Video-178K"
    (root / "0_30_s_nextqa").mkdir(parents=True)
    (root / "README.md").write_text(
        "---\nconfigs:\n- config_name: 0_30_s_nextqa\n  data_files:\n  - split: open_ended\n"
        '    path: "0_30_s_nextqa/*oe*.json"\n---\n'
    )
    rows = [
        {
            "id": "1",
            "data_source": "NextQA",
            "video": "NextQA/clip_1",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat does the square do?"},
                {"from": "gpt", "value": "It moves down."},
                {"from": "human", "value": "Which way?"},
                {"from": "gpt", "value": "To the right."},
            ],
        }
    ]
    (root / "0_30_s_nextqa" / "nextqa_oe_qa_processed.json").write_text(json.dumps(rows))
    videos = tmp_path / "videos"
    save_video_frames(make_video_frames(4, 56, 56), videos / "NextQA" / "clip_1")

    (sample,) = load_source(
        f"llava_video_178k:{root}", video_root=str(videos), cache_dir=str(tmp_path / "cache")
    )
    first = sample["messages"][0]["content"]
    assert first == [
        {"type": "video", "video": str(videos / "NextQA" / "clip_1")},
        {"type": "text", "text": "What does the square do?"},
    ]
    assert [m["role"] for m in sample["messages"]] == ["user", "assistant", "user", "assistant"]
    assert answers(sample) == [
        [{"type": "text", "text": "It moves down."}],
        [{"type": "text", "text": "To the right."}],
    ]
    assert encodes(encoder, sample)
    with pytest.raises(TypeError):
        next(llava_video_178k(path=root))  # video_root is required


def test_makers_table():
    assert set(MAKERS) == {"cord_v2", "medpix", "raven", "llava_video_178k"}


def test_hf_source_picks_a_split_and_resolves_paths_against_its_folder(tmp_path, monkeypatch):
    def rows(answer):
        return {"messages": [[{"role": "user", "content": [{"type": "image", "image": "images/a.png"},
                                                           {"type": "text", "text": "What?"}]},
                              {"role": "assistant", "content": [{"type": "text", "text": answer}]}]]}

    folder = tmp_path / "data" / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows("TRAIN")),
                          "test": datasets.Dataset.from_dict(rows("TEST"))}).save_to_disk(folder)
    monkeypatch.chdir(tmp_path)  # relative to the dataset's folder, not the working directory
    (train,) = load_source("hf:data/dd")
    (test,) = load_source("hf:data/dd@test")
    answers = [sample["messages"][1]["content"][0]["text"] for sample in (train, test)]
    assert answers == ["TRAIN", "TEST"]
    assert train["messages"][0]["content"][0]["image"] == str(folder.resolve() / "images" / "a.png")
    with pytest.raises(ValueError, match="no split 'dev'"):
        list(load_source("hf:data/dd@dev"))


def test_hf_source_reads_one_data_file_and_resolves_paths_against_its_folder(tmp_path):
    rows = {"messages": [[{"role": "user", "content": [{"type": "image", "image": "a.png"},
                                                       {"type": "text", "text": "What?"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "Red."}]}]]}
    datasets.Dataset.from_dict(rows).to_parquet(tmp_path / "data.parquet")
    (sample,) = load_source(f"hf:{tmp_path / 'data.parquet'}", cache_dir=str(tmp_path / "cache"))
    assert sample["messages"][0]["content"][0]["image"] == str(tmp_path.resolve() / "a.png")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"notes\.txt: not a data file datasets reads by name"):
        list(load_source(f"hf:{tmp_path / 'notes.txt'}"))


def test_a_plain_path_is_read_by_its_kind(tmp_path, monkeypatch):
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    (tmp_path / "rows.jsonl").write_text(json.dumps(row) + "\n")
    (tmp_path / "rows.json").write_text(json.dumps([row]))
    ds = datasets.Dataset.from_dict({"messages": [row["messages"]]})
    ds.to_parquet(str(tmp_path / "rows.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    monkeypatch.chdir(tmp_path)
    for spec in ("rows.jsonl", str(tmp_path / "rows.json"), "rows.parquet", "saved"):
        samples = list(load_source(spec))
        assert len(samples) == 1 and samples[0]["messages"][1]["role"] == "assistant", spec
    datasets.DatasetDict({"train": ds, "validation": datasets.concatenate_datasets([ds, ds])}).save_to_disk(
        str(tmp_path / "splits"))
    assert len(list(load_source("splits@validation"))) == 2 and len(list(load_source("splits"))) == 1
    for missing in ("nothing.jsonl", "data/nothing"):
        with pytest.raises(ValueError, match=f"^data source {missing}: no such file or folder$"):
            load_source(missing)


def test_a_missing_local_source_is_named_before_anything_loads(tmp_path):
    from vlm_bridge.data.sources import check_source

    (tmp_path / "rows.jsonl").write_text("")
    check_source(str(tmp_path / "rows.jsonl"), "data.train")
    check_source(f"jsonl:{tmp_path / 'rows.jsonl'}", "data.train")
    check_source("hf:org/not-downloaded", "data.train")  # a hub name: read (from the cache) later
    for spec in (f"jsonl:{tmp_path / 'gone.jsonl'}", str(tmp_path / "gone.parquet"), "gone/folder"):
        needle = f"^data.validation: data source {re.escape(spec)}: no such file or folder$"
        with pytest.raises(ValueError, match=needle):
            check_source(spec, "data.validation")
    with pytest.raises(ValueError, match="^data.train: unknown source 'csv:x.csv'"):
        check_source("csv:x.csv", "data.train")
    with pytest.raises(ValueError, match="^data.train: data source hf:./gone: no such file or folder$"):
        check_source("hf:./gone", "data.train")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"^data.train: data source .*notes.txt: not a .jsonl/.json file, "):
        check_source(str(tmp_path / "notes.txt"), "data.train")


def test_an_output_over_a_data_source_is_refused(tmp_path):
    from vlm_bridge.convert.hf_io import CheckpointError
    from vlm_bridge.data.sources import refuse_output_over_source

    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "part.jsonl").write_text("")
    refuse_output_over_source(tmp_path / "run", "output_dir", str(folder), "data.train")  # beside it: fine
    with pytest.raises(CheckpointError, match="is the input data.train"):
        refuse_output_over_source(folder, "output_dir", str(folder), "data.train")
    with pytest.raises(CheckpointError, match="is a folder holding the input data.train"):
        refuse_output_over_source(tmp_path, "output_dir", f"jsonl:{folder / 'part.jsonl'}", "data.train")
    with pytest.raises(ValueError, match="^--report .*report.json is inside the data folder --data "):
        refuse_output_over_source(folder / "report.json", "--report", str(folder), "--data")
    with pytest.raises(ValueError, match="is inside the data folder"):
        refuse_output_over_source(folder / "run", "output_dir", f"{folder}@validation", "data.train")
    refuse_output_over_source(tmp_path / "run", "output_dir", "hf:org/name", "data.train")  # a hub name


def test_a_folder_datasets_cannot_read_as_one_table_is_one_line(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    (folder / "a.jsonl").write_text(json.dumps(row) + "\n")
    (folder / "b.json").write_text(json.dumps({"metrics": {"loss": 1.0}, "data": "x"}))
    with pytest.raises(ValueError, match=r"^data source .*mixed: datasets could not read it as one table"):
        list(load_source(str(folder)))


def test_a_bare_name_and_a_makers_local_copy_that_are_not_there_are_named(tmp_path):
    from vlm_bridge.data.sources import check_source

    for spec, says in (("missing_dir", "no such file or folder, nor a maker"),
                       ("cord_v2:/no/such", "no such file or folder$")):
        with pytest.raises(ValueError, match=f"^data.train: data source {spec}: {says}"):
            check_source(spec, "data.train")
