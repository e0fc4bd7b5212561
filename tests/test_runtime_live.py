"""``fmgs-play BUNDLE udp://...``: the live path end to end on loopback, against the file path."""
from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest

pytest.importorskip("torch")

from fmgs.pose_stream import encode_pose  # noqa: E402
from fmgs.runtime.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def bundle(smpl_path, tmp_path_factory):
    from runtime_avatar import build_small_avatar, export_small_bundle

    model, surfels = build_small_avatar(smpl_path, seed=1)
    return export_small_bundle(model, surfels, tmp_path_factory.mktemp("live") / "bundle")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_live_udp_frames_match_the_file_path(bundle, tmp_path, monkeypatch, capsys):
    import imageio.v3 as iio

    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    pose = np.zeros((24, 3))
    pose[16, 2], pose[17, 2], pose[4, 0] = -0.9, 0.9, 0.6   # arms down, a knee bent
    trans = np.array([0.1, 0.0, -0.2])
    # the reference: the same pose from a file
    ref_dir = tmp_path / "ref"
    np.savez(tmp_path / "pose.npz", poses=pose[None].reshape(1, 72), trans=trans[None], fps=30.0)
    assert main([str(bundle), str(tmp_path / "pose.npz"), "--headless", "--out", f"{ref_dir}/", "--size", "64",
                 "--frames", "1"]) == 0
    ref = iio.imread(ref_dir / "frame_000000.png")

    port = _free_port()
    out_dir = tmp_path / "live"
    rc = {}
    th = threading.Thread(target=lambda: rc.setdefault("rc", main(
        [str(bundle), f"udp://127.0.0.1:{port}", "--headless", "--out", f"{out_dir}/", "--size", "64",
         "--frames", "3"])), daemon=True)
    th.start()
    seq = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        deadline = time.time() + 60.0
        while th.is_alive() and time.time() < deadline:
            s.sendto(b"not a pose packet", ("127.0.0.1", port))
            s.sendto(encode_pose(pose, trans, seq, stream=7, up="+y"), ("127.0.0.1", port))
            s.sendto(encode_pose(pose + 1.0, trans, max(seq - 1, 0), stream=7), ("127.0.0.1", port))  # late
            seq += 1
            time.sleep(0.03)
    th.join(timeout=5.0)
    assert rc.get("rc") == 0
    text = capsys.readouterr().out
    assert "pose-to-pixels latency" in text and "malformed" in text and "late" in text
    frames = sorted(out_dir.glob("frame_*.png"))
    assert len(frames) == 3
    for f in frames:  # every live frame is the pose sent, drawn exactly as from the file
        img = iio.imread(f)
        assert np.abs(img.astype(int) - ref.astype(int)).max() <= 1
