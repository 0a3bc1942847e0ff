"""Images and videos of chat-schema samples, loaded the one way training, generation and evaluation
share: images as RGB PIL images; videos from a file (decoded with PyAV, sampled as the family's
processor samples), a folder of frame images or a list of frames."""

from __future__ import annotations

from pathlib import Path
from typing import Any

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def open_image(path: str | Path, what: str = "image") -> Any:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {what} {path} ({type(exc).__name__}: {exc})") from None


def load_image(value: Any) -> Any:
    """A path or a PIL image -> an RGB PIL image."""
    return open_image(value) if isinstance(value, str | Path) else value.convert("RGB")


def load_video(value: Any, processor, fps: float | None = None) -> tuple[Any, dict, dict]:
    """``(frames, metadata, processor kwargs)`` for a video item.

    Frames given directly (a folder of images or a list) are taken as sampled at ``fps`` (2 by
    default) and used as they are; a file is decoded and sampled by :func:`read_video`.
    """
    if isinstance(value, str | Path):
        path = Path(value)
        if path.is_dir():
            files = sorted(f for f in path.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise ValueError(f"video folder {path} holds no image frames")
            value = files
        elif not path.is_file():
            raise ValueError(f"cannot read video {path} (no such file or folder)")
        else:
            from vlm_bridge.data.video import read_video

            return read_video(path, processor, fps)
    if isinstance(value, list | tuple):
        value = [open_image(f, "video frame") if isinstance(f, str | Path) else f for f in value]
    return value, {"total_num_frames": len(value), "fps": fps or 2.0}, {}
