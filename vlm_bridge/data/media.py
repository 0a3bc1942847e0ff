"""Images and videos of chat-schema samples, loaded the one way training, verify, generation and
evaluation share: images as RGB PIL images; videos from a file (decoded with PyAV, sampled as the
family's processor samples, :mod:`vlm_bridge.data.video`), a folder of frame images or a list of
frames; and the media arguments of one processor call built from them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from vlm_bridge.data.video import DecodedVideo, read_video, sample_like_processor

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Frame rate assumed for videos given as frames (folder or list) when none is set.
FRAMES_FPS = 2.0


def shown(value: Any, limit: int = 120) -> str:
    """A media reference as an error message shows it (a base64 image is not echoed whole)."""
    text = str(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def local_media(value: str | Path, what: str = "image") -> Path | bytes:
    """A media reference as a local path, or the bytes of a ``data:...;base64,`` URI: ``file://``
    URLs and ``~`` are read as paths; ``http(s)://`` is refused (nothing is downloaded at run
    time)."""
    text = str(value)
    if text.startswith("data:"):
        import base64
        import binascii

        header, comma, payload = text.partition(",")
        if not comma or not header.endswith(";base64"):
            raise ValueError(f"cannot read {what} {shown(text)} (a data URI must be base64: "
                             "data:...;base64,...)")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"cannot read {what} {shown(text)} (invalid base64)") from None
    if text.startswith("file://"):
        from urllib.parse import unquote, urlparse

        return Path(unquote(urlparse(text).path))
    if text.startswith(("http://", "https://")):
        raise ValueError(f"{what} {shown(text)} is a web address; media are not downloaded at run time: "
                         "download it and give its path")
    return Path(text).expanduser()


def open_image(path: str | Path, what: str = "image") -> Any:
    import io

    from PIL import Image

    source = local_media(path, what)
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            return upright_rgb(image)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {what} {shown(path)} ({type(exc).__name__}: {shown(exc)})") from None


def upright_rgb(image: Any) -> Any:
    """An RGB copy turned as its EXIF orientation says (a phone photo stores landscape pixels and
    tags them as rotated), as transformers' ``load_image`` gives it to the HF processors."""
    from PIL import ImageOps

    return ImageOps.exif_transpose(image).convert("RGB")


def load_image(value: Any) -> Any:
    """A path or a PIL image -> an upright RGB PIL image (one-line ValueError naming a bad file)."""
    return open_image(value) if isinstance(value, str | Path) else upright_rgb(value)


def load_video(value: Any, processor: Any, fps: float | None = None) -> DecodedVideo:
    """A video item -> frames, metadata and processor kwargs.

    Frames given directly (a folder of images or a list) are taken as sampled at ``fps`` (else
    ``FRAMES_FPS``) and used as they are; a file is decoded and sampled by :func:`read_video`, with
    ``fps`` replacing the processor's own rate when given; a :class:`DecodedVideo` is used as is.
    """
    if isinstance(value, DecodedVideo):
        return value
    if isinstance(value, str | Path):
        path = local_media(value, "video")
        if isinstance(path, bytes):
            raise ValueError(f"video {shown(value)}: videos are read from files, not data URIs")
        if path.is_dir():
            files = sorted(f for f in path.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise ValueError(f"video folder {path} holds no image frames")
            value = files
        elif not path.is_file():
            raise ValueError(f"cannot read video {path} (no such file or folder)")
        else:
            return read_video(path, processor, fps)
    if isinstance(value, list | tuple):
        names = [str(f) if isinstance(f, str | Path) else f"frame {i}" for i, f in enumerate(value)]
        value = [open_image(f, "video frame") if isinstance(f, str | Path) else f for f in value]
        sizes = [f.size if hasattr(f, "getbands") else None for f in value]  # PIL frames: (w, h)
        for name, size in zip(names, sizes):
            if size is not None and sizes[0] is not None and size != sizes[0]:
                raise ValueError(f"video frame {name} is {size[0]}x{size[1]} but {names[0]} is "
                                 f"{sizes[0][0]}x{sizes[0][1]}: a video's frames share one size")
    # Every frame counts as taken (``frames_indices``): a video processor that does not sample
    # (some processors' default where a folder has no video config) reads frame times from them.
    metadata = {"total_num_frames": len(value), "fps": fps or FRAMES_FPS,
                "frames_indices": list(range(len(value)))}
    return DecodedVideo(value, metadata, {})


def processor_media(images: list[Any] | None, videos: list[DecodedVideo], processor: Any) -> dict[str, Any]:
    """``images`` / ``videos`` / ``video_metadata`` and sampling kwargs for one processor call.

    ``images`` is what the call takes as is (a flat list, or one list per row). Decoded files come
    sampled with ``do_sample_frames=False``, a flag that covers every video of the call: videos
    given as frames are then sampled here, as the processor would have sampled them.
    """
    media: dict[str, Any] = {}
    if images and any(images):
        media["images"] = images
    for video in videos:
        media.update(video.processor_kwargs)
    if media.get("do_sample_frames") is False:
        videos = [v if v.processor_kwargs
                  else DecodedVideo(*sample_like_processor(v.frames, v.metadata, processor), {})
                  for v in videos]
    if videos:
        frames = [v.frames for v in videos]
        if any(isinstance(f, np.ndarray) for f in frames):  # decoded files: [T, H, W, 3] arrays
            # HF converts frame lists to arrays only when the first video is one; convert all.
            frames = [np.stack([np.asarray(x) for x in f]) if isinstance(f, list) else f for f in frames]
        media["videos"] = frames
        media["video_metadata"] = [v.metadata for v in videos]
    return media
