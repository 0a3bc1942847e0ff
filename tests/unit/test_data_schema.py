"""The sample schema: what validates, and one-line errors that name the problem."""

from __future__ import annotations

import pytest

from vlm_bridge.data.schema import validate_sample
from vlm_bridge.testing.media import make_image, make_video_frames


def _sample(*messages):
    return {"messages": list(messages)}


def test_valid_samples_pass():
    validate_sample(
        _sample(
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": "a.png"},
                    {"type": "image", "image": make_image(56, 56)},
                    {"type": "video", "video": make_video_frames(2, 56, 56)},
                    {"type": "video", "video": "clips/frames"},
                    {"type": "text", "text": "Compare."},
                ],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "Same."}]},
        ),
        "sample 0",
    )


@pytest.mark.parametrize(
    "sample, message",
    [
        ([], "expected a dict with a 'messages' list"),
        ({"messages": []}, "'messages' must be a non-empty list"),
        (
            _sample({"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}),
            "message 1 has role 'bot'",
        ),
        (_sample({"role": "user", "content": 3}), "message 0 content must be a string or a list"),
        (_sample({"role": "user", "content": [{"type": "audio"}]}), "message 0 item 0 has type 'audio'"),
        (_sample({"role": "user", "content": [{"type": "image"}]}), "item 0 has no 'image' field"),
        (_sample({"role": "user", "content": [{"type": "image", "image": 5}]}), "has a image of type int"),
        (_sample({"role": "user", "content": [{"type": "video", "video": []}]}), "empty video frame list"),
        (_sample({"role": "user", "content": [{"type": "text", "text": None}]}), "non-string text"),
    ],
)
def test_errors_name_the_problem(sample, message):
    with pytest.raises(ValueError) as info:
        validate_sample(sample, "sample 12")
    text = str(info.value)
    assert text.startswith("sample 12: ") and message in text and "\n" not in text
