"""Atomic file writes: a file is either its old complete self or its new complete self.

Checkpoints, bundles and metrics are written to a temporary file in the same
folder, flushed to disk, then moved over the target with :func:`os.replace`
(atomic on POSIX and Windows). An interrupted write leaves at most a stray
``.tmp-*`` file, never a truncated target.

Folders (bundles) are staged in hidden siblings named by :func:`staging_prefix`
(``.tmp-``/``.stage-``/``.old-<name>-<pid>-XXXXXXXX``) that :func:`clean_stale` removes on
the next write once their writer is gone. :func:`check_replaceable` is the one rule for
replacing an existing folder: only what the project itself wrote, never a folder that is
or holds what the command reads.
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
    and ``target`` is left untouched. The published file has the mode a plain
    ``open()`` gives under the current umask (:func:`default_mode`, ``0o644`` under
    umask 022), not ``mkstemp``'s ``0o600``.

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
        # mkstemp creates 0600; the published file gets what open() would have given it
        os.chmod(tmp_path, default_mode())
        os.replace(tmp_path, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def write_json_atomic(target: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``target`` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


# =========================================================================== permissions
def current_umask() -> int:
    """The process umask (read from ``/proc/self/status`` where possible, so no thread ever
    sees a temporarily changed umask; else by setting and restoring it)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_mode(is_dir: bool = False) -> int:
    """The mode a plain ``open()`` / ``mkdir()`` would give under the current umask
    (``0o644`` / ``0o755`` under umask 022). ``tempfile`` creates ``0o600`` / ``0o700``
    entries; published files get this mode instead."""
    return (0o777 if is_dir else 0o666) & ~current_umask()


# =========================================================================== staging folders
#: Kinds of sibling folders the writers stage in: ``.tmp-`` (bundle being assembled),
#: ``.stage-`` (export intermediates), ``.old-`` (the replaced bundle, removed right after).
STAGING_KINDS = ("tmp", "stage", "old")
#: A staging entry without a recorded writer pid (older writers) is stale after this long.
STALE_AGE_S = 3600.0


def staging_prefix(target: str | os.PathLike, kind: str) -> str:
    """Name prefix of a staging sibling of ``target``: ``.<kind>-<name>-<pid>-``.

    The writer's pid in the name lets :func:`clean_stale` tell a folder of a live writer
    from one left behind by a killed process. Pass it as ``prefix`` to
    :func:`tempfile.mkdtemp` / :class:`tempfile.TemporaryDirectory` with ``dir`` the parent.
    """
    if kind not in STAGING_KINDS:
        raise ValueError(f"staging kind must be one of {STAGING_KINDS}, got {kind!r}")
    return f".{kind}-{Path(target).name}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def clean_stale(target: str | os.PathLike, max_age_s: float = STALE_AGE_S) -> list[Path]:
    """Remove staging folders that an interrupted (``kill -9``) write of ``target`` left.

    Only siblings named by :func:`staging_prefix` for this very target are considered
    (``.tmp-<name>-<pid>-XXXXXXXX``, ``.stage-...``, ``.old-...``; the 8-character random
    suffix is :mod:`tempfile`'s), and only real folders (never symlinks) owned by this user.
    One is stale when its writer pid no longer runs; entries of older writers without a pid
    (``.tmp-<name>-XXXXXXXX``) when not modified for ``max_age_s`` seconds.

    Args:
        target: the file or folder about to be written.
        max_age_s: age after which a pid-less staging folder counts as stale.

    Returns:
        The removed paths.
    """
    import re
    import shutil
    import time

    target = Path(target)
    parent = target.parent
    if not parent.is_dir():
        return []
    kinds = "|".join(STAGING_KINDS)
    pat = re.compile(rf"^\.({kinds})-{re.escape(target.name)}-(?:(\d+)-)?[A-Za-z0-9_]{{8}}$")
    removed = []
    now = time.time()
    uid = os.getuid() if hasattr(os, "getuid") else None
    for entry in os.scandir(parent):
        m = pat.match(entry.name)
        if m is None or not entry.is_dir(follow_symlinks=False):
            continue
        st = entry.stat(follow_symlinks=False)
        if uid is not None and st.st_uid != uid:
            continue
        pid = m.group(2)
        if pid is not None:
            if _pid_alive(int(pid)):
                continue
        elif now - st.st_mtime < max_age_s:
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(Path(entry.path))
    return removed


# =========================================================================== safe replace
def _inside(a: Path, b: Path) -> bool:
    """Whether ``a`` is ``b`` or lies inside it (both resolved)."""
    return a == b or b in a.parents


def check_replaceable(target: str | os.PathLike, is_ours, protect=(), what: str = "folder") -> None:
    """Refuse to replace ``target`` unless the project itself wrote it.

    The one rule every replace (``--overwrite``) goes through: a missing ``target`` is
    fine; an existing one may be replaced only when it is a real folder (not a symlink,
    not a file), neither is nor contains any ``protect`` path (e.g. the run folder an
    export reads; lying *inside* one is fine: a bundle in its run folder), is not the
    file-system root, the home or the current folder, and ``is_ours(target)`` recognises
    it (for bundles: a manifest of ours that lists every entry of the folder).

    Args:
        target: the folder about to be replaced.
        is_ours: ``callable(Path) -> None | str``: None when ``target`` is ours, else the
            reason it is not (shown to the user).
        protect: paths that must survive the replace (resolved before comparing).
        what: noun for messages (``"bundle folder"``).

    Raises:
        FmgsInputError: ``target`` may not be replaced; the message names it and why.
    """
    from fmgs.errors import FmgsInputError

    target = Path(target)
    if not os.path.lexists(target):
        return
    if target.is_symlink():
        raise FmgsInputError(f"refusing to replace: the {what} is a symbolic link", target)
    if not target.is_dir():
        raise FmgsInputError(f"refusing to replace: not a {what} (a file of that name exists)", target)
    real = target.resolve()
    for p in protect:
        pr = Path(p).resolve()
        if _inside(pr, real):
            rel = "is" if pr == real else "contains"
            raise FmgsInputError(f"refusing to replace: this folder {rel} {p}, which the command reads "
                                 "(choose another --out)", target)
    special = {Path(real.anchor)}
    for where in (Path.home, Path.cwd):
        with contextlib.suppress(OSError, RuntimeError):   # no $HOME, or a deleted cwd
            special.add(where().resolve())
    if real in special:
        raise FmgsInputError(f"refusing to replace the root, home or current folder as a {what}", target)
    why = is_ours(target)
    if why is not None:
        raise FmgsInputError(f"refusing to replace: {why}; only a {what} written by fmgs is replaced "
                             "(remove it yourself or choose another --out)", target)


# =========================================================================== folder swap
def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries to disk (best effort: a file system without it is ignored)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def publish_folder(staged: str | os.PathLike, target: str | os.PathLike, recheck=None) -> None:
    """Move the complete folder ``staged`` (a sibling made with :func:`staging_prefix`) to
    ``target``, replacing an existing ``target`` in two renames.

    An existing ``target`` is first moved into a ``.old-`` staging sibling (removed at the
    end; :func:`clean_stale` removes it after a crash), so at every moment ``target`` is
    either the old complete folder or the new one (absent for an instant between the renames).

    Args:
        staged: the finished folder, on the same file system as ``target``.
        target: the destination folder.
        recheck: called with no argument right before an existing ``target`` is moved away
            (e.g. :func:`check_replaceable` again: the folder may have changed during a
            long write); it raises to refuse.
    """
    import shutil
    import tempfile

    staged, target = Path(staged), Path(target)
    fsync_dir(staged)
    old = None
    if os.path.lexists(target):
        if recheck is not None:
            recheck()
        old = Path(tempfile.mkdtemp(prefix=staging_prefix(target, "old"), dir=target.parent))
        os.rename(target, old / "x")
    os.rename(staged, target)
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
