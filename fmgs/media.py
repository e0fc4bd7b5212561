"""Writing videos: the one place the project encodes frames (imageio-ffmpeg, H.264).

Files are written through :func:`fmgs.atomic.atomic_path`, so an interrupted encode never
leaves a truncated video where a finished one was.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np

from fmgs.atomic import atomic_path
from fmgs.errors import FmgsInputError

#: Suffixes :class:`VideoWriter` encodes.
VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov", ".avi", ".webm", ".gif")


class VideoWriter:
    """Stream RGB frames into a video file, published atomically on :meth:`close`.

    Args:
        path: output file; its suffix picks the container (:data:`VIDEO_SUFFIXES`; H.264 for
            all but ``.gif``).
        fps: frames per second, > 0.

    Frames are ``(H, W, 3)`` uint8, all of one size. H.264 needs even sizes: frames of odd
    width or height are padded by one black column / row (``macro_block_size=1`` keeps
    imageio from resizing them).

    Raises:
        FmgsInputError: unknown suffix or a bad frame rate (names the file).
    """

    def __init__(self, path: str | os.PathLike, fps: float):
        self.path = Path(path)
        if self.path.suffix.lower() not in VIDEO_SUFFIXES:
            raise FmgsInputError(f"not a video file name (use one of {', '.join(VIDEO_SUFFIXES)})", self.path)
        if not np.isfinite(fps) or fps <= 0:
            raise FmgsInputError(f"video frame rate must be > 0, got {fps}", self.path)
        import imageio.v2 as imageio

        self.count = 0
        self._ctx = atomic_path(self.path)
        tmp = self._ctx.__enter__()
        self._h264 = self.path.suffix.lower() != ".gif"
        kw = {"codec": "libx264", "quality": 8, "macro_block_size": 1} if self._h264 else {}
        self._writer = imageio.get_writer(str(tmp), fps=float(fps), **kw)

    def write(self, frame: np.ndarray) -> None:
        """Append one ``(H, W, 3)`` uint8 frame."""
        img = np.asarray(frame)
        if self._h264 and (img.shape[0] % 2 or img.shape[1] % 2):
            img = np.pad(img, ((0, img.shape[0] % 2), (0, img.shape[1] % 2), (0, 0)))
        self._writer.append_data(img)
        self.count += 1

    def close(self, ok: bool = True) -> None:
        """Finish the file: publish it (``ok``) or drop it (an aborted write leaves nothing).

        Raises:
            FmgsInputError: ``ok`` but no frame was written (an empty video is no result:
                nothing is published).
        """
        if self._ctx is None:
            return
        self._writer.close()
        ctx, self._ctx = self._ctx, None
        if ok and self.count:
            ctx.__exit__(None, None, None)
            return
        ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)
        if ok:
            raise FmgsInputError("no frames were rendered; no video written", self.path)

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, exc, traceback) -> bool:
        self.close(ok=exc_type is None)
        return False


def write_video(path: str | os.PathLike, frames: Iterable[np.ndarray], fps: float) -> Path:
    """Encode ``frames`` (each ``(H, W, 3)`` uint8) into ``path`` atomically (:class:`VideoWriter`).

    Returns:
        ``path``.
    """
    with VideoWriter(path, fps) as w:
        for f in frames:
            w.write(f)
    return Path(path)
