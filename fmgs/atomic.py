"""Atomic file writes: a file is either its old complete self or its new complete self.

Checkpoints, bundles and metrics are written to a temporary file in the same
folder, flushed to disk, then moved over the target with :func:`os.replace`
(atomic on POSIX and Windows). An interrupted write leaves at most a stray
``.tmp-*`` file, never a truncated target.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success move it over ``target``.

    Usage::

        with atomic_path("ckpt.pt") as tmp:
            torch.save(state, tmp)

    On an exception (including KeyboardInterrupt) the temporary file is removed
    and ``target`` is left untouched.

    Args:
        target: final file path. Its parent folder is created if missing.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Keep the target name (and suffix) at the end: writers such as ffmpeg pick the format from it.
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=f"-{target.name}", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def write_json_atomic(target: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``target`` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
