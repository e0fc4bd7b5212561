"""Bad input never costs a user their files (docs/reliability.md).

``fmgs-export --overwrite`` (and every bundle writer) replaces only a bundle folder of ours:
never the run folder, a parent holding it, a folder of user files, a symlink or a file;
``fmgs-eval --max-frames 0`` never clobbers an earlier ``metrics.json``; staging folders of a
killed writer are cleaned on the next write; published files get the umask's permissions;
the bundle reader refuses symlinks out of the bundle. Every refusal is checked to leave
every file of the tree exactly as it was (names, bytes).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fmgs import bundle as fb
from fmgs.atomic import atomic_path, check_replaceable, clean_stale, default_mode, staging_prefix
from fmgs.errors import FmgsInputError

sys.path.insert(0, str(Path(__file__).parent))
from test_bundle import _body_model, _random_surfels, _write_full  # noqa: E402


def snapshot(root: Path) -> dict[str, str]:
    """``{relative path: sha256 or 'dir' or 'link->target'}`` of everything under ``root``."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link->" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def fake_run(root: Path, name: str = "run") -> Path:
    """A run folder as fmgs-train leaves it (config, checkpoint, eval results), with made-up bytes."""
    run = root / name
    (run / "eval").mkdir(parents=True)
    (run / "config.yaml").write_text("data:\n  image_size: 64\n")
    (run / "checkpoint.pt").write_bytes(os.urandom(4096))
    (run / "eval" / "metrics.json").write_text(json.dumps({"psnr": 31.5, "ssim": 0.97}) + "\n")
    return run


def export_cli(argv: list[str]) -> tuple[int, str]:
    from fmgs.export.cli import main

    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, err.getvalue()


# =========================================================================== fmgs-export --overwrite
@pytest.mark.parametrize("case", ["run_itself", "parent_of_run", "user_files", "symlink", "file",
                                  "bundle_with_user_file", "bundle_holding_run"])
def test_export_overwrite_refuses_what_is_not_our_bundle(tmp_path, case):
    """Each case: exit 2 with a one-line message naming --out, before any work, nothing touched."""
    root = tmp_path / "runs"
    run = fake_run(root)
    fake_run(root, "other_run")
    rng = np.random.default_rng(0)
    if case == "run_itself":
        out = run
    elif case == "parent_of_run":
        out = root
    elif case == "user_files":
        out = tmp_path / "photos"
        out.mkdir()
        (out / "holiday.jpg").write_bytes(os.urandom(1000))
    elif case == "symlink":
        (tmp_path / "real").mkdir()
        out = tmp_path / "link"
        out.symlink_to(tmp_path / "real")
    elif case == "file":
        out = tmp_path / "notes.txt"
        out.write_text("mine")
    elif case == "bundle_with_user_file":
        out = _write_full(tmp_path, rng, name="bundle")
        (out / "notes.txt").write_text("my notes")
    else:  # a bundle manifest placed in a folder that holds the run
        b = _write_full(tmp_path, rng, name="b0")
        out = tmp_path / "wrapper"
        out.mkdir()
        for f in b.iterdir():
            (out / f.name).write_bytes(f.read_bytes())
        run = fake_run(out, "run")
    before = snapshot(tmp_path)
    rc, err = export_cli([str(run), "--out", str(out), "--overwrite", "--no-check", "--trt", "off"])
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {out}: refusing to replace"), err
    assert "Traceback" not in err
    assert snapshot(tmp_path) == before


def test_replace_rule_messages(tmp_path):
    """The shared helper says why: the run is inside, the folder is not ours, ..."""
    run = fake_run(tmp_path / "runs")
    with pytest.raises(FmgsInputError, match=r"is .*run, which the command reads"):
        fb.check_bundle_replaceable(run, protect=[run])
    with pytest.raises(FmgsInputError, match=r"contains .*run, which the command reads"):
        fb.check_bundle_replaceable(tmp_path / "runs", protect=[run])
    with pytest.raises(FmgsInputError, match="no manifest.json of an fmgs bundle"):
        fb.check_bundle_replaceable(run)
    fb.check_bundle_replaceable(tmp_path / "missing")          # nothing there: fine
    with pytest.raises(FmgsInputError, match="current folder"):
        check_replaceable(Path.cwd(), lambda p: None)


def test_overwriting_our_bundle_is_allowed_and_preview_writer_follows_the_rule(tmp_path):
    """A bundle of ours (also one inside the run folder) is replaced; the preview-bundle
    writer of fmgs-train --preview goes through the same rule."""
    rng = np.random.default_rng(1)
    run = fake_run(tmp_path)
    old = _write_full(run, rng, name="bundle")                   # RUN/bundle, ours
    surf = _random_surfels(rng, kind="preview")
    fb.write_bundle(old, surf, kind="preview", body_model=_body_model(rng), overwrite=True, protect=[run])
    assert fb.read_bundle(old).kind == "preview"
    assert sorted(p.name for p in run.iterdir()) == ["bundle", "checkpoint.pt", "config.yaml", "eval", "src"]
    # write_preview_bundle defaults to overwrite=True: a user folder at its target survives
    (run / "preview").mkdir()
    (run / "preview" / "keep.txt").write_text("x")
    with pytest.raises(FmgsInputError, match="no manifest.json"):
        fb.write_bundle(run / "preview", surf, kind="preview", body_model=_body_model(rng), overwrite=True)
    assert (run / "preview" / "keep.txt").read_text() == "x"


# =========================================================================== fmgs-eval
def test_eval_max_frames_0_keeps_metrics(tmp_path):
    from fmgs.trainer.cli.main import eval_main

    run = fake_run(tmp_path)
    before = snapshot(tmp_path)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = eval_main([str(run), "--max-frames", "0"])
    assert rc == 2 and err.getvalue().strip() == "error: --max-frames must be a positive number of frames, got 0"
    assert snapshot(tmp_path) == before


# =========================================================================== kill -9 leftovers
def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_staging_folders_are_cleaned_on_the_next_write(tmp_path):
    """Folders a killed writer left (dead pid, or pid-less and old) go; a live writer's, other
    targets' and user folders of similar names stay."""
    rng = np.random.default_rng(2)
    dead, live = _dead_pid(), os.getpid()
    stale = [f".tmp-b-{dead}-abcd1234", f".stage-b-{dead}-x_y12345", f".old-b-{dead}-qwertyui", ".tmp-b-zxcvbnm1"]
    keep = [f".tmp-b-{live}-abcd1234", f".tmp-other-{dead}-abcd1234", ".stage-b-notours", "b-backup"]
    for n in stale + keep:
        (tmp_path / n).mkdir()
        (tmp_path / n / "big.bin").write_bytes(b"0" * 100)
    old = time.time() - 7200
    os.utime(tmp_path / ".tmp-b-zxcvbnm1", (old, old))
    _write_full(tmp_path, rng, name="b")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep + ["b", "src"])
    # a recent pid-less folder may belong to a running older writer: kept
    (tmp_path / ".old-b-recent12").mkdir()
    assert clean_stale(tmp_path / "b") == []


def test_staging_names_carry_the_pid():
    assert staging_prefix("/x/bundle", "stage") == f".stage-bundle-{os.getpid()}-"
    with pytest.raises(ValueError):
        staging_prefix("/x/b", "junk")


def test_published_files_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "m.json") as tmp:
            tmp.write_text("{}")
        b = _write_full(tmp_path, np.random.default_rng(3))
    finally:
        os.umask(old)
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == 0o644
    assert b.stat().st_mode & 0o777 == 0o755
    assert {f.stat().st_mode & 0o777 for f in b.iterdir()} == {0o644}
    assert default_mode() == 0o666 & ~old and default_mode(True) == 0o777 & ~old


# =========================================================================== reader and symlinks
def test_reader_refuses_symlinks_out_of_the_bundle(tmp_path):
    rng = np.random.default_rng(4)
    b = _write_full(tmp_path, rng)
    secret = tmp_path / "secret.onnx"
    secret.write_bytes((b / "color.onnx").read_bytes())          # same bytes: sizes and sha256 match
    (b / "color.onnx").unlink()
    (b / "color.onnx").symlink_to(secret)
    with pytest.raises(FmgsInputError, match="symbolic link out of the bundle") as ei:
        fb.read_bundle(b)
    assert ei.value.path == str(b / "color.onnx")
    # a link that stays inside the bundle is fine
    (b / "color.onnx").unlink()
    (b / "inside.bin").write_bytes(secret.read_bytes())
    (b / "color.onnx").symlink_to("inside.bin")
    fb.read_bundle(b)
