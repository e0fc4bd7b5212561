"""Live pose streams: packet codec, receiver robustness (fuzzed), VMC conversion, loopback UDP."""
from __future__ import annotations

import socket
import struct
import time
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.transform import Rotation

from fmgs.errors import FmgsInputError
from fmgs.motion import Motion, world_from_up
from fmgs.pose_stream import (
    PACKET_SIZE, PacketError, PoseStreamState, UdpPoseReceiver, VmcState, decode_pose, encode_pose,
    parse_stream_url, send_motion, vmc_to_smpl,
)
from fmgs.skeleton import smpl_fk_positions


def _pose(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(scale=0.5, size=(24, 3)), rng.normal(size=3)


def test_packet_layout_and_round_trip():
    p, t = _pose(0)
    b = encode_pose(p, t, seq=7, stream=0xDEADBEEF, timestamp=1234.5, up="+z")
    assert len(b) == PACKET_SIZE == 328
    # the documented layout, read back independently with struct
    magic, ver, up, nj, seq, sid, ts = struct.unpack_from("<4sBBHIId", b, 0)
    assert (magic, ver, up, nj, seq, sid, ts) == (b"FMGP", 1, 4, 24, 7, 0xDEADBEEF, 1234.5)
    vals = np.array(struct.unpack_from("<75f", b, 24))
    np.testing.assert_allclose(vals[:72], p.reshape(-1).astype(np.float32))
    assert struct.unpack_from("<I", b, 324)[0] == zlib.crc32(b[:324])
    pkt = decode_pose(b)
    np.testing.assert_allclose(pkt.poses, p, atol=1e-6)
    np.testing.assert_allclose(pkt.trans, t, atol=1e-6)
    assert (pkt.seq, pkt.stream, pkt.timestamp, pkt.up) == (7, 0xDEADBEEF, 1234.5, "+z")


def test_bad_packets_are_classified():
    p, t = _pose(1)
    good = encode_pose(p, t, 1, 5)
    with pytest.raises(PacketError) as e:
        decode_pose(good[:-1])
    assert e.value.kind == "malformed"
    flipped = bytearray(good)
    flipped[100] ^= 4
    with pytest.raises(PacketError, match="CRC"):
        decode_pose(bytes(flipped))
    p2 = p.copy()
    p2[3, 1] = np.nan
    with pytest.raises(PacketError) as e:
        decode_pose(encode_pose(p2, t, 1, 5))
    assert e.value.kind == "nonfinite"
    with pytest.raises(PacketError) as e:
        decode_pose(encode_pose(p, np.array([1e6, 0, 0]), 1, 5))
    assert e.value.kind == "invalid"


def test_stream_state_drops_late_holds_and_follows_restarts():
    s = PoseStreamState()
    p, t = _pose(2)
    assert s.feed(encode_pose(p, t, 5, 1)) == "accepted"
    assert s.feed(encode_pose(p + 1, t, 4, 1)) == "late"  # out of order
    assert s.feed(encode_pose(p + 1, t, 5, 1)) == "late"  # duplicate
    gen, pkt = s.latest()
    np.testing.assert_allclose(pkt.poses, p, atol=1e-6)  # the late packet did not replace the pose
    # nothing new: the pose holds
    gen2, pkt2 = s.wait_new(gen, 0.05)
    assert gen2 == gen and pkt2 is pkt
    # a restarted sender (new stream id, sequence from 0) is picked up
    assert s.feed(encode_pose(p + 2, t, 0, 2)) == "accepted"
    assert s.feed(encode_pose(p + 3, t, 6, 1)) == "stale"  # a straggler of the old stream
    assert s.counts["restarts"] == 1 and s.counts["late"] == 2 and s.counts["stale"] == 1
    np.testing.assert_allclose(s.latest()[1].poses, p + 2, atol=1e-5)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=700))
def test_fuzzed_datagrams_never_raise(data):
    for state in (PoseStreamState(), VmcState()):
        r = state.feed(data)
        assert r in ("accepted", "malformed", "nonfinite", "invalid", "late", "stale", "ignored")
        assert state.counts["errors"] == 0
        assert state.counts["packets"] == 1


@settings(max_examples=200, deadline=None)
@given(st.integers(0, PACKET_SIZE - 1), st.integers(0, 7))
def test_every_single_bit_flip_is_rejected(pos, bit):
    p, t = _pose(3)
    b = bytearray(encode_pose(p, t, 1, 9))
    b[pos] ^= 1 << bit
    s = PoseStreamState()
    assert s.feed(bytes(b)) == "malformed"


# ----------------------------------------------------------------------------- VMC
def _osc_bone(name: str, p, q) -> bytes:
    from pythonosc.osc_message_builder import OscMessageBuilder

    b = OscMessageBuilder(address="/VMC/Ext/Bone/Pos")
    b.add_arg(name)
    for v in (*p, *q):
        b.add_arg(float(v), "f")
    return b.build().dgram


def _osc_root(p, q) -> bytes:
    from pythonosc.osc_message_builder import OscMessageBuilder

    b = OscMessageBuilder(address="/VMC/Ext/Root/Pos")
    b.add_arg("root")
    for v in (*p, *q):
        b.add_arg(float(v), "f")
    return b.build().dgram


def test_vmc_hand_computed_cases():
    """Cases worked by hand from the VMC spec (protocol.vmc.info: Bone/Pos = Unity
    HumanBodyBones name, local position, local rotation quaternion x y z w, Unity's
    left-handed frame: x right, y up, z forward)."""
    rest = np.zeros((24, 3))
    rest[16], rest[18] = [0.2, 0.4, 0.0], [0.45, 0.4, 0.0]  # left shoulder -> elbow along SMPL +x
    rest[1], rest[4] = [0.1, -0.1, 0.0], [0.1, -0.5, 0.0]
    s45 = np.sqrt(0.5)
    # 1. Unity Quaternion.Euler(0, 0, 90) on LeftUpperArm: (x, y, z, w) = (0, 0, s45, s45). In Unity it
    #    turns the arm's rest direction, the avatar's left = Unity -x, to (0, -1, 0): the arm hangs down.
    poses, _ = vmc_to_smpl({"LeftUpperArm": (np.zeros(3), np.array([0, 0, s45, s45]))}, None)
    pos = smpl_fk_positions(poses[None], np.zeros((1, 3)), rest)[0]
    d = (pos[18] - pos[16]) / np.linalg.norm(pos[18] - pos[16])
    np.testing.assert_allclose(d, [0, -1, 0], atol=1e-12)
    # 2. Unity Quaternion.Euler(0, 90, 0) on Hips: the avatar turns from facing Unity +z to Unity +x,
    #    its own right side. In SMPL's frame (x = avatar's left) it then faces -x.
    poses, _ = vmc_to_smpl({"Hips": (np.zeros(3), np.array([0, s45, 0, s45]))}, None)
    fwd = Rotation.from_rotvec(poses[0]).apply([0, 0, 1])
    np.testing.assert_allclose(fwd, [-1, 0, 0], atol=1e-12)
    # 3. Unity Quaternion.Euler(90, 0, 0) on LeftUpperLeg = (s45, 0, 0, s45): in Unity it turns the leg's
    #    rest direction (0, -1, 0) to (0, 0, -1): the leg swings backwards.
    poses, _ = vmc_to_smpl({"LeftUpperLeg": (np.zeros(3), np.array([s45, 0, 0, s45]))}, None)
    pos = smpl_fk_positions(poses[None], np.zeros((1, 3)), rest)[0]
    d = (pos[4] - pos[1]) / np.linalg.norm(pos[4] - pos[1])
    np.testing.assert_allclose(d, [0, 0, -1], atol=1e-12)
    # 4. Root/Pos at Unity (1, 0, 2), Hips local position (0, 0.9, 0): the pelvis is at SMPL (-1, 0.9, 2)
    _, trans = vmc_to_smpl({"Hips": (np.array([0, 0.9, 0]), np.array([0, 0, 0, 1.0]))},
                           (np.array([1.0, 0, 2.0]), np.array([0, 0, 0, 1.0])), rest)
    np.testing.assert_allclose(trans + rest[0], [-1, 0.9, 2], atol=1e-12)


def test_vmc_state_over_osc_bundles_and_garbage():
    from pythonosc.osc_bundle_builder import IMMEDIATELY, OscBundleBuilder
    from pythonosc.osc_message_builder import OscMessageBuilder

    s45 = np.sqrt(0.5)
    bb = OscBundleBuilder(IMMEDIATELY)
    for dg in (_osc_root([0, 0, 0], [0, 0, 0, 1]), _osc_bone("LeftUpperArm", [0, 0, 0], [0, 0, s45, s45])):
        from pythonosc.osc_message import OscMessage

        bb.add_content(OscMessage(dg))
    ok = OscMessageBuilder(address="/VMC/Ext/OK")
    ok.add_arg(1)
    bb.add_content(ok.build())
    st_ = VmcState()
    assert st_.feed(bb.build().dgram) == "accepted"
    np.testing.assert_allclose(st_.latest()[1].poses[16], [0, 0, -np.pi / 2], atol=1e-6)
    assert st_.counts["ignored"] == 1
    assert st_.feed(b"\x00garbage") == "malformed"
    assert st_.feed(_osc_bone("LeftUpperArm", [0, 0, 0], [np.nan, 0, 0, 1])) == "ignored"
    assert st_.counts["nonfinite"] == 1


def test_stream_url_parsing():
    assert parse_stream_url("udp://127.0.0.1:9000") == ("udp", "127.0.0.1", 9000)
    assert parse_stream_url("vmc://0.0.0.0:39539") == ("vmc", "0.0.0.0", 39539)
    for bad in ("tcp://a:1", "udp://:5", "udp://host", "udp://h:70000", "udp://h:x"):
        with pytest.raises(FmgsInputError):
            parse_stream_url(bad)


# ----------------------------------------------------------------------------- loopback
def _motion(n: int = 30) -> Motion:
    rng = np.random.default_rng(4)
    poses = rng.normal(scale=0.3, size=(n, 24, 3))
    return Motion(poses=poses, trans=rng.normal(size=(n, 3)), fps=60.0, world_from_motion=world_from_up("+z"),
                  betas=None, source="synthetic", kind="smpl")


def test_loopback_stream_with_garbage_and_a_sender_restart():
    """A real UDP socket on 127.0.0.1: two senders in turn (a restart), one of them also
    sending malformed datagrams; everything valid is accepted, everything bad counted, the
    last pose holds after the senders stop. Bounded to about 2 s."""
    m = _motion(30)
    with UdpPoseReceiver("127.0.0.1", 0) as rx:
        host, port = rx.address
        a = send_motion(m, host, port, corrupt=0.3, seed=1)          # 0.5 s at 60 fps
        b = send_motion(m, host, port, duration=0.25)                # restarted sender
        deadline = time.time() + 2.0
        while time.time() < deadline and rx.state.counts["packets"] < a["sent"] + a["bad"] + b["sent"]:
            time.sleep(0.02)
        c = dict(rx.state.counts)
        assert c["packets"] == a["sent"] + a["bad"] + b["sent"]
        assert c["accepted"] == a["sent"] + b["sent"] and a["bad"] > 0
        assert c["malformed"] + c["nonfinite"] == a["bad"]
        assert c["restarts"] == 1 and c["late"] == 0 and c["errors"] == 0
        gen, pkt = rx.state.latest()
        assert pkt.stream == b["stream"] and pkt.seq == b["sent"] - 1 and pkt.up == "+z"
        np.testing.assert_allclose(pkt.poses, m.poses[b["sent"] - 1], atol=1e-6)
        # the sender is gone: the pose holds
        assert rx.state.wait_new(gen, 0.2)[1] is pkt
        # foreign traffic on the port does not disturb it
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"\xff" * 1000, (host, port))
        time.sleep(0.1)
        assert rx.state.latest()[1] is pkt and rx.state.counts["malformed"] == c["malformed"] + 1
