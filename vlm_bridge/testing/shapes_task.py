"""A small synthetic visual task for the demo: one coloured shape per image, questions about it.

Questions ask for the colour (4 choices) or the shape (3 choices), so chance accuracy is 25% or
33%. Accuracy is measured by scoring every candidate answer with the model (teacher forcing, sum
of log-probabilities) and taking the best, which needs no generation and no string matching.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (230, 210, 20)}
SHAPES = ("circle", "square", "triangle")
QUESTIONS = {"colour": "What colour is the shape?", "shape": "Which shape is shown?"}


def draw_shape(shape: str, colour: str, size: int, rng: random.Random) -> Image.Image:
    img = Image.new("RGB", (size, size), (235, 235, 235))
    draw = ImageDraw.Draw(img)
    r = rng.randint(size // 4, size // 3)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def make_task(folder: str | Path, n_train: int, n_eval: int, size: int = 56, seed: int = 0) -> dict:
    """Write images and ``train.jsonl`` / ``eval.jsonl`` (chat schema); returns their paths."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = {}
    for split, n in (("train", n_train), ("eval", n_eval)):
        rows = []
        for i in range(n):
            shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
            kind = rng.choice(list(QUESTIONS))
            name = f"images/{split}_{i:05d}.png"
            draw_shape(shape, colour, size, rng).save(folder / name)
            rows.append({"messages": [
                {"role": "user", "content": [{"type": "image", "image": name},
                                             {"type": "text", "text": QUESTIONS[kind]}]},
                {"role": "assistant", "content": [{"type": "text",
                                                   "text": colour if kind == "colour" else shape}]},
            ], "kind": kind})
        paths[split] = folder / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def candidates(kind: str) -> list[str]:
    return list(COLOURS) if kind == "colour" else list(SHAPES)


@torch.no_grad()
def choice_accuracy(model, processor, eval_jsonl: str | Path, limit: int | None = None) -> float:
    """Fraction of eval questions whose highest-likelihood candidate answer is the right one."""
    folder = Path(eval_jsonl).parent
    rows = [json.loads(line) for line in Path(eval_jsonl).read_text().splitlines()][:limit]
    correct = 0
    for row in rows:
        user = row["messages"][0]
        image = Image.open(folder / user["content"][0]["image"]).convert("RGB")
        prompt = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, user["content"][1]]}],
            add_generation_prompt=True, tokenize=False,
        )
        scores = {}
        for answer in candidates(row["kind"]):
            batch = processor(text=[prompt + answer], images=[image], return_tensors="pt")
            n_answer = len(processor.tokenizer(answer, add_special_tokens=False)["input_ids"])
            logits = model(**batch).logits[0, -n_answer - 1:-1].float()
            targets = batch["input_ids"][0, -n_answer:]
            scores[answer] = logits.log_softmax(-1).gather(1, targets[:, None]).sum().item()
        correct += max(scores, key=scores.get) == row["messages"][1]["content"][0]["text"]
    return correct / max(len(rows), 1)
