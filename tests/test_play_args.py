"""fmgs-play rejects bad options before any work: exit 2, one line naming the option, no file
written (docs/reliability.md)."""
from __future__ import annotations

import contextlib
import io
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from fmgs.errors import FmgsInputError

sys.path.insert(0, str(Path(__file__).parent))
from test_bundle import _body_model, _random_surfels  # noqa: E402


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from fmgs import bundle as fb

    root = tmp_path_factory.mktemp("play")
    rng = np.random.default_rng(0)
    surf = _random_surfels(rng, kind="preview", S=32)
    surf["opacities"] = np.full(32, 0.9)
    b = fb.write_bundle(root / "bundle", surf, kind="preview", body_model=_body_model(rng))
    m = root / "clip.npy"
    np.save(m, np.zeros((4, 72)))
    return b, m


def _play(argv):
    from fmgs.runtime.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, err.getvalue()


@pytest.mark.parametrize("opts,msg", [
    (["--size", "65", "33"], "--size 65x33: H.264 video needs even width and height; use --size 66 34"),
    (["--size", "1"], "--size must be 16..8192 pixels per side, got 1x1"),
    (["--size", "64", "64", "64"], "--size takes one or two values"),
    (["--frames", "-5"], "--frames must be at least 1, got -5"),
    (["--frames", "0"], "--frames must be at least 1, got 0"),
    (["--fps", "1e9"], "--fps must be a rate in 0.1..1000 frames per second, got 1e+09"),
    (["--fps", "0"], "--fps must be a rate in 0.1..1000"),
    (["--fps", "-30"], "--fps must be a rate in 0.1..1000"),
    (["--fps", "nan"], "--fps must be a rate in 0.1..1000"),
    (["--source-fps", "1e-6"], "--source-fps must be a rate in 0.1..1000"),
    (["--background", "2", "0", "0"], "--background takes R G B in [0, 1]"),
    (["--render-threads", "0"], "--render-threads must be at least 1"),
    (["--cull-backfaces", "7"], "--cull-backfaces is a cosine in [-1, 1]"),
], ids=lambda v: "_".join(v) if isinstance(v, list) else None)
def test_bad_options_exit_2_with_one_line(inputs, tmp_path, opts, msg):
    b, m = inputs
    out = tmp_path / "clip.mp4"
    rc, err = _play([str(b), str(m), "--headless", "--out", str(out), *opts])
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith(f"fmgs-play: error: {msg}"), err
    assert os.listdir(tmp_path) == []


def test_odd_sizes_are_fine_for_png_frames(inputs, tmp_path):
    from fmgs.runtime.cli import build_parser, validate_args

    args = build_parser().parse_args(["b", "m", "--headless", "--out", str(tmp_path / "frames/"), "--size", "65", "33"])
    assert validate_args(args) == (65, 33)


@pytest.mark.parametrize("opt,module", [("--inference=tensorrt", "tensorrt"), ("--arrays=cupy", "cupy")])
def test_missing_optional_backends_say_how_to_install(inputs, tmp_path, opt, module):
    from fmgs.runtime.inference import tensorrt_status
    from fmgs.runtime.xp import cupy_status

    if (tensorrt_status() if module == "tensorrt" else cupy_status())[0]:
        pytest.skip(f"{module} works on this machine")
    b, m = inputs
    rc, err = _play([str(b), str(m), "--headless", "--out", str(tmp_path / "c.mp4"), opt])
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert f"{opt.replace('=', ' ')}: not available" in err and "install: pip install" in err
    assert os.listdir(tmp_path) == []


def test_empty_video_is_never_published(tmp_path):
    """A sink closed without frames raises and leaves no file (no 0-byte mp4 'success')."""
    from fmgs.runtime.app import _Sink

    sink = _Sink(tmp_path / "v.mp4", 30.0)
    with pytest.raises(FmgsInputError, match="no frames were rendered"):
        sink.close(True)
    assert os.listdir(tmp_path) == []
