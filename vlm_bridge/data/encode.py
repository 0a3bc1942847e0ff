"""Turn schema samples into model inputs with assistant-only labels, for any HF VLM processor.

Everything model-specific comes from the Hugging Face processor: the chat template renders the
conversation, ``processor(text=..., images=..., videos=...)`` tokenizes it, expands the media
placeholders and produces the pixel tensors. Nothing here resizes pixels or hard-codes a token,
so a new family only needs a processor with a chat template.

Loss mask. The assistant header (what the template adds as the generation prompt) and footer
(what it emits after an assistant message) are read off the template once, by rendering probe
conversations. Each assistant turn's content plus its end-of-turn token is located in the
rendered text, mapped to tokens through the tokenizer's offsets, and carried over to the
processor's (media-expanded) token sequence by aligning the two token sequences: they differ only
where the processor expanded a media placeholder, which never lies inside assistant text.

Truncation. Over-long samples are cut at ``max_seq_len`` but never inside a media span (the
placeholder tokens of one image/video plus the special tokens right around them): a cut inside a
span moves to before the span, and that media item's pixel rows are dropped so token and feature
counts still agree. A sample left with nothing to learn is skipped and counted, never mangled.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from vlm_bridge.data.media import load_image, load_video, processor_media
from vlm_bridge.data.schema import MEDIA_TYPES, iter_media, template_messages, validate_sample

IGNORE_INDEX = -100
# How a processor lays out each media kind: the pixel tensor, an optional per-item grid (grid-based
# processors flatten every item's patches into one tensor, item i owning grid[i].prod() rows) and
# per-item extras. Processors without a grid (one entry per item, e.g. [n, C, H, W]) work too.
# Used to drop whole media items from the end when a sample is truncated.
MEDIA_LAYOUT = {
    "image": ("pixel_values", "image_grid_thw", ()),
    "video": ("pixel_values_videos", "video_grid_thw", ("second_per_grid_ts",)),
}
SKIP_REASONS = ("too_long", "bad_media", "no_loss_tokens")


# What an HF processor raises on media it cannot handle (e.g. an image too thin for a patch grid
# divides by zero in some image processors).
PROCESSOR_MEDIA_ERRORS = (ValueError, ArithmeticError, IndexError)


class BadMediaError(ValueError):
    """An image or video file is missing or cannot be decoded (the message names the file)."""


@dataclass
class EncodedSample:
    """One encoded conversation, unpadded and without a batch dimension.

    ``labels`` is aligned with ``input_ids`` and NOT shifted: ``labels[i]`` is the target for
    predicting token ``i`` (it equals ``input_ids[i]`` on assistant tokens and is -100
    elsewhere), the Hugging Face convention. The trainer shifts (logits at ``i - 1`` are
    scored against ``labels[i]``).

    ``media`` holds exactly the processor's non-per-token tensors for this sample (pixels, grids,
    timing; minus media dropped by truncation), whatever the family's processor calls them.
    ``tokens`` holds its other per-token outputs without the batch dimension (e.g.
    ``mm_token_type_ids`` or ``token_type_ids``). Both are also readable as attributes
    (``sample.pixel_values``), None when absent.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    num_loss_tokens: int
    media: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: dict[str, torch.Tensor] = field(default_factory=dict)
    truncated: bool = False
    # The family's positions of this sample alone ([..., 1, n]), once a training stream has worked
    # them out (next to the encoding, in its worker process when it has workers).
    positions: torch.Tensor | None = None

    def __getattr__(self, name: str):
        # Only called for names that are not fields: processor outputs by name.
        if name.startswith("__"):
            raise AttributeError(name)
        fields = self.__dict__
        if name in fields.get("media", {}):
            return fields["media"][name]
        return fields.get("tokens", {}).get(name)

    def __len__(self) -> int:
        return int(self.input_ids.numel())

    def model_inputs(self, with_labels: bool = False) -> dict[str, torch.Tensor]:
        """A batch of one for a HF ``...ForConditionalGeneration`` forward (tests, evaluation)."""
        batch: dict[str, torch.Tensor] = {
            "input_ids": self.input_ids[None],
            "attention_mask": torch.ones_like(self.input_ids)[None],
            **self.media,
            **{key: value[None] for key, value in self.tokens.items()},
        }
        if with_labels:
            batch["labels"] = self.labels[None]
        return batch


def keep_first_media(
    pixels: torch.Tensor | None, grid_thw: torch.Tensor | None, keep: int
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Return the pixel rows and grid rows of the first ``keep`` media items of one kind.

    Grid-based processors concatenate every item's patches into one ``pixel_values`` tensor,
    item after item, so item ``i`` owns ``grid_thw[i].prod()`` consecutive rows and the first
    ``keep`` items own the first ``grid_thw[:keep].prod(-1).sum()`` rows. Processors without a
    grid (one entry per item, e.g. ``[n, C, H, W]``) keep the first ``keep`` entries. Truncation
    only ever drops media from the end, which is why a prefix is all that is needed. Returns
    ``(None, None)`` when nothing is kept, as the processor does for a sample without media.
    """
    if pixels is None or keep == 0:
        return None, None
    if grid_thw is None:
        return pixels[:keep], None
    rows = int(grid_thw[:keep].prod(-1).sum())
    return pixels[:rows], grid_thw[:keep]


def _runs(ids: torch.Tensor, token_id: int) -> list[tuple[int, int]]:
    """Maximal runs ``[start, end)`` of ``token_id`` in a 1-D id tensor."""
    hit = (ids == token_id).tolist()
    runs, start = [], None
    for i, h in enumerate([*hit, False]):
        if h and start is None:
            start = i
        elif not h and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _embed(plain: list[int], expanded: list[int]) -> list[int | None] | None:
    """Position in ``expanded`` of each ``plain`` token, or None if ``expanded`` is not ``plain``
    with tokens inserted.

    Processors expand a media placeholder by inserting tokens around or after it (one repeats
    ``<|image_pad|>``, another wraps ``<start_of_image>``), so one greedy linear pass finds the
    mapping; insertions only happen in prompt turns, so assistant tokens are never matched to an
    inserted token.
    """
    positions: list[int | None] = []
    j, n = 0, len(expanded)
    for token in plain:
        while j < n and expanded[j] != token:
            j += 1
        if j == n:
            return None
        positions.append(j)
        j += 1
    return positions


def _align_slow(plain: list[int], expanded: list[int]) -> list[int | None]:
    """General alignment (difflib, quadratic) for processors that replace tokens rather than
    only insert; tokens outside matching blocks map to None."""
    positions: list[int | None] = [None] * len(plain)
    matcher = difflib.SequenceMatcher(None, plain, expanded, autojunk=False)
    for i, j, size in matcher.get_matching_blocks():
        positions[i : i + size] = range(j, j + size)
    return positions


def render_chat(processor, messages: list[dict[str, Any]], where: str,
                add_generation_prompt: bool = False) -> str:
    """The conversation through the processor's chat template; a conversation the template refuses
    (roles that do not alternate, an image in a system turn) is named by ``where``."""
    import jinja2

    try:
        return processor.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except jinja2.TemplateError as exc:
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise ValueError(f"{where}: the model's chat template rejected this conversation "
                         f"({reason})") from None


class SampleEncoder:
    """Encode schema samples with one HF processor; see the module docstring for the rules.

    Video files are decoded with PyAV and sampled as the processor itself samples them (see
    :mod:`vlm_bridge.data.video`); ``video_fps``, when set, replaces the processor's sampling rate
    there. It is also the rate assumed for videos given as frames (folder or list; else
    ``FRAMES_FPS``), which sets the temporal position spacing (e.g. ``second_per_grid_ts``).
    ``stats`` counts encoded, truncated and skipped samples, the latter by reason (``too_long``,
    ``bad_media``, ``no_loss_tokens``).
    """

    def __init__(
        self, processor: Any, max_seq_len: int, skip_bad_media: bool = False, video_fps: float | None = None,
        bad_media_hint: str = "",
    ) -> None:
        if max_seq_len <= 0:
            raise ValueError(f"max_seq_len must be positive, got {max_seq_len}")
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError("SampleEncoder needs a fast tokenizer (offsets map the loss mask to tokens)")
        self.max_seq_len = max_seq_len
        self.skip_bad_media = skip_bad_media
        self.bad_media_hint = bad_media_hint  # appended to unreadable-media errors (an option to skip them)
        self.video_fps = video_fps
        self.stats: dict[str, int] = {"encoded": 0, "truncated": 0, **dict.fromkeys(SKIP_REASONS, 0)}
        self.skip_examples: dict[str, str] = {}  # the first skipped sample of each reason, and why
        self.header, self.footer, self.end_of_turn = self._probe_template()
        self.media_token_ids = {kind: self._media_token_id(kind) for kind in MEDIA_TYPES}
        self._control_ids = set(self.tokenizer.all_special_ids) | set(
            getattr(self.tokenizer, "added_tokens_decoder", {})
        )

    # --- template ------------------------------------------------------------------------------

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False,
               where: str = "sample") -> str:
        """The conversation as text, through the processor's own chat template."""
        return render_chat(self.processor, messages, where, add_generation_prompt)

    def _probe_template(self) -> tuple[str, str, str]:
        """Read the assistant header, footer and end-of-turn text off the chat template.

        header = what the template puts between the user turn and a stored assistant message's
        content (else the generation prompt: render([user], generation prompt) minus render([user]));
        footer = what follows an assistant message's content; end-of-turn = its first token.

        The two headers differ in reasoning templates, whose generation prompt opens a ``<think>``
        block that stored assistant turns do not carry: training follows the stored form.
        """
        user = {"role": "user", "content": [{"type": "text", "text": "Probe question."}]}
        sentinel = "Probe answer 7QX."
        bare, prompted = self.render([user]), self.render([user], add_generation_prompt=True)
        full = self.render([user, {"role": "assistant", "content": [{"type": "text", "text": sentinel}]}])
        if sentinel not in full:
            raise ValueError("chat template does not render assistant text content")
        before = full[: full.rindex(sentinel)]
        if before.startswith(bare) and len(before) > len(bare):
            header = before[len(bare) :]
        elif prompted.startswith(bare) and len(prompted) > len(bare):
            header = prompted[len(bare) :]
        else:
            raise ValueError("chat template: the generation prompt is not a suffix of the user turn")
        footer = full[full.rindex(sentinel) + len(sentinel) :]
        offsets = self.tokenizer(footer, add_special_tokens=False, return_offsets_mapping=True)[
            "offset_mapping"
        ]
        if not offsets:
            raise ValueError("chat template emits nothing after an assistant message (no end-of-turn)")
        return header, footer, footer[: offsets[0][1]]

    def _media_token_id(self, kind: str) -> int | None:
        """Placeholder token id of ``kind`` from the processor (``image_token_id`` etc.)."""
        token_id = getattr(self.processor, f"{kind}_token_id", None)
        if token_id is None and getattr(self.processor, f"{kind}_token", None):
            token_id = self.tokenizer.convert_tokens_to_ids(getattr(self.processor, f"{kind}_token"))
        return token_id

    def _loss_char_spans(self, text: str, num_assistant: int) -> list[tuple[int, int]]:
        """Character spans of each assistant turn's content plus its end-of-turn token."""
        spans, pos = [], 0
        for turn in range(num_assistant):
            head = text.find(self.header, pos)
            if head < 0:
                raise ValueError(f"chat template: assistant turn {turn} has no header {self.header!r}")
            start = head + len(self.header)
            end = text.find(self.end_of_turn, start)
            end = len(text) if end < 0 else end + len(self.end_of_turn)
            spans.append((start, end))
            pos = end
        return spans

    # --- media ---------------------------------------------------------------------------------

    def _load(self, kind: str, value: Any) -> Any:
        try:
            return load_image(value) if kind == "image" else load_video(value, self.processor, self.video_fps)
        except ValueError as exc:
            raise BadMediaError(str(exc)) from None

    # --- encoding ------------------------------------------------------------------------------

    def _skip(self, reason: str, detail: str) -> None:
        self.stats[reason] += 1
        self.skip_examples.setdefault(reason, detail)

    def encode(self, sample: Mapping[str, Any], where: str = "sample") -> EncodedSample | None:
        """Encode one sample; None (and ``stats[reason] += 1``) when it is skipped.

        Raises ``ValueError`` for a malformed sample, and for a missing/unreadable image or
        video unless ``skip_bad_media``.
        """
        validate_sample(sample, where)
        messages = sample["messages"]
        if any(m["role"] == "assistant" and any(iter_media({"messages": [m]})) for m in messages):
            raise ValueError(f"{where}: images/videos in assistant turns are not supported")
        try:
            images = [self._load(k, v) for k, v in iter_media(sample) if k == "image"]
            loaded = [self._load(k, v) for k, v in iter_media(sample) if k == "video"]
        except BadMediaError as exc:
            if self.skip_bad_media:
                self._skip("bad_media", f"{where}: {exc}")
                return None
            raise BadMediaError(f"{where}: {exc}{self.bad_media_hint}") from None
        plain = template_messages(messages)
        text = self.render(plain, where=where)
        num_assistant = sum(m["role"] == "assistant" for m in messages)
        media_kwargs = processor_media(images, loaded, self.processor)
        try:
            out = self.processor(text=[text], return_tensors="pt", add_special_tokens=False, **media_kwargs)
        except PROCESSOR_MEDIA_ERRORS as exc:
            if not media_kwargs:
                raise
            rejected = f"{where}: the processor rejected its media ({type(exc).__name__}: {exc})"
            if self.skip_bad_media:
                self._skip("bad_media", rejected)
                return None
            raise BadMediaError(rejected + self.bad_media_hint) from None
        input_ids = out["input_ids"][0].long()
        labels = self._labels(text, num_assistant, input_ids, where)
        per_token = {
            key: value[0]
            for key, value in out.items()
            if key not in ("input_ids", "attention_mask")
            and isinstance(value, torch.Tensor)
            and value.shape[:2] == (1, input_ids.numel())
        }
        vision = {
            key: value for key, value in out.items()
            if key not in ("input_ids", "attention_mask", *per_token) and isinstance(value, torch.Tensor)
        }
        others = set(out) - {"input_ids", "attention_mask", *per_token, *vision}
        if int((labels != IGNORE_INDEX).sum()) == 0:
            self._skip("no_loss_tokens", f"{where}: no assistant token to learn from")
            return None
        truncated = input_ids.numel() > self.max_seq_len
        if truncated:
            known = {k for pix, grid, extra in MEDIA_LAYOUT.values() for k in (pix, grid, *extra)}
            unknown = others | (set(vision) - known)
            if unknown:  # media this encoder cannot cut between (e.g. per-image patch grids it does
                # not know): the sample cannot fit, and is skipped and counted as such
                self._skip("too_long", f"{where}: {input_ids.numel()} tokens, media that cannot be cut "
                                       f"({', '.join(sorted(unknown))})")
                return None
            cut, keep = self._safe_cut(input_ids, vision, where)
            input_ids, labels = input_ids[:cut], labels[:cut]
            per_token = {key: value[:cut] for key, value in per_token.items()}
            vision = self._drop_media(vision, keep)
            if int((labels != IGNORE_INDEX).sum()) == 0:
                self._skip("too_long", f"{where}: no assistant token within max_seq_len {self.max_seq_len}")
                return None
        self.stats["encoded"] += 1
        self.stats["truncated"] += int(truncated)
        return EncodedSample(
            input_ids=input_ids,
            labels=labels,
            num_loss_tokens=int((labels != IGNORE_INDEX).sum()),
            media=vision,
            tokens=per_token,
            truncated=truncated,
        )

    def iter_encoded(self, samples: Iterable[Mapping[str, Any]]) -> Iterator[EncodedSample]:
        """Encode a stream, dropping skipped samples (they are counted in ``stats``)."""
        for index, sample in enumerate(samples):
            encoded = self.encode(sample, where=f"sample {index}")
            if encoded is not None:
                yield encoded

    def _labels(self, text: str, num_assistant: int, input_ids: torch.Tensor, where: str) -> torch.Tensor:
        """Assistant-only labels over the processor's tokens (see the module docstring).

        A token is a loss token when its characters overlap an assistant span, so a token that
        straddles the header/content boundary is still learned rather than silently dropped.
        """
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        plain_ids: list[int] = enc["input_ids"]
        plain_labels = [IGNORE_INDEX] * len(plain_ids)
        spans = self._loss_char_spans(text, num_assistant)
        for t, (s, e) in enumerate(enc["offset_mapping"]):
            if any(s < span_end and e > span_start for span_start, span_end in spans):
                plain_labels[t] = plain_ids[t]
        ids = input_ids.tolist()
        positions = _embed(plain_ids, ids)
        if positions is None:
            positions = _align_slow(plain_ids, ids)
        labels = [IGNORE_INDEX] * len(ids)
        for t, label in enumerate(plain_labels):
            if label != IGNORE_INDEX:
                if positions[t] is None:
                    raise RuntimeError(
                        f"{where}: processor tokens differ from the template's inside an assistant turn"
                    )
                labels[positions[t]] = label
        return torch.tensor(labels, dtype=torch.long)

    def _media_spans(
        self, input_ids: torch.Tensor, vision: Mapping[str, torch.Tensor], where: str
    ) -> list[tuple[int, int, str]]:
        """Token spans ``(start, end, kind)`` of every image and video, start/end tokens included.

        A span is the run(s) of one item's placeholder tokens plus the control tokens right
        before and after (e.g. ``<|vision_start|>`` / ``<|vision_end|>``). Items are matched to
        runs one to one, or by temporal grid steps for processors that emit one run per frame
        group; anything else is refused rather than guessed.
        """
        spans = []
        for kind, (_, grid_key, _) in MEDIA_LAYOUT.items():
            token_id, grid = self.media_token_ids[kind], vision.get(grid_key)
            runs = _runs(input_ids, token_id) if token_id is not None else []
            count = int(grid.shape[0]) if grid is not None else len(runs)
            if len(runs) == count:
                groups = [[run] for run in runs]
            elif grid is not None and len(runs) == int(grid[:, 0].sum()):
                steps = [0, *grid[:, 0].cumsum(0).tolist()]
                groups = [runs[steps[i] : steps[i + 1]] for i in range(count)]
            else:
                raise ValueError(f"{where}: cannot match {len(runs)} {kind} token runs to {count} {kind}s")
            for group in groups:
                start, end = group[0][0], group[-1][1]
                if start > 0 and int(input_ids[start - 1]) in self._control_ids:
                    start -= 1
                if end < input_ids.numel() and int(input_ids[end]) in self._control_ids:
                    end += 1
                spans.append((start, end, kind))
        return sorted(spans)

    def _safe_cut(
        self, input_ids: torch.Tensor, vision: Mapping[str, torch.Tensor], where: str
    ) -> tuple[int, dict[str, int]]:
        """``max_seq_len`` moved back to the start of any media span it would split, and how
        many items of each kind lie wholly before the cut (media are only ever dropped from the
        end, so the kept ones are a prefix of each kind)."""
        spans = self._media_spans(input_ids, vision, where)
        cut = self.max_seq_len
        for start, end, _ in spans:
            if start < cut < end:
                cut = start
        keep = {kind: sum(end <= cut for _, end, k in spans if k == kind) for kind in MEDIA_TYPES}
        return cut, keep

    @staticmethod
    def _drop_media(vision: Mapping[str, torch.Tensor], keep: Mapping[str, int]) -> dict[str, torch.Tensor]:
        """Vision tensors of the first ``keep[kind]`` images / videos."""
        out: dict[str, torch.Tensor] = {}
        for kind, (pix_key, grid_key, extras) in MEDIA_LAYOUT.items():
            pixels, grid = keep_first_media(vision.get(pix_key), vision.get(grid_key), keep[kind])
            if pixels is None:
                continue
            out[pix_key] = pixels
            if grid is not None:
                out[grid_key] = grid
            for key in extras:
                if key in vision:
                    out[key] = vision[key][: keep[kind]]
        return out
