"""Live SMPL pose streams over UDP: the packet format, a receiver, a VMC receiver and a sender.

**Packet (version 1)**, one UDP datagram, little-endian, 328 bytes:

======  =====  ==========  =========================================================
offset  bytes  type        field
======  =====  ==========  =========================================================
0       4      ``4s``      magic ``b"FMGP"``
4       1      ``u8``      version = 1
5       1      ``u8``      up axis of the pose's world: index into
                           ``("+x", "-x", "+y", "-y", "+z", "-z")`` (2 = +y, the
                           player's world; 4 = +z, e.g. AMASS)
6       2      ``u16``     number of joints = 24
8       4      ``u32``     sequence number (per stream, increasing)
12      4      ``u32``     stream id (random per sender start: a new id is a restart)
16      8      ``f64``     timestamp: sender's ``time.time()`` when the pose was sent,
                           seconds (Unix epoch)
24      288    ``72 x f32`` SMPL axis-angle, radians, 24 joints x (x, y, z), SMPL joint
                           order; joint 0 = global orientation (as ``Motion.poses``)
312     12     ``3 x f32`` root translation, metres (SMPL ``transl``, as ``Motion.trans``)
324     4      ``u32``     CRC-32 (``zlib.crc32``) of bytes 0..323
======  =====  ==========  =========================================================

The pose is placed as a :class:`fmgs.motion.Motion` frame with
``world_from_motion = world_from_up(up)``.

**Receiving** (:class:`PoseStreamState`, used by :class:`UdpPoseReceiver`): a datagram of
the wrong size, magic, version, joint count or CRC is counted ``malformed`` and ignored;
non-finite values ``nonfinite``; absurd values (angles > 1e3 rad, translation > 1e4 m)
``invalid``. Within a stream, a sequence number not above the newest accepted one is
``late`` (out of order or duplicate) and dropped. A packet of a new stream id starts a new
stream (``restarts``; the old id is retired and its stragglers counted ``stale``). The
newest accepted pose is kept until a newer one arrives (a paused sender holds the pose).
Nothing a datagram holds can raise out of :meth:`PoseStreamState.feed`.

**VMC** (:class:`VmcState`, :class:`VmcReceiver`): the Virtual Motion Capture protocol
(OSC over UDP; https://protocol.vmc.info/english): ``/VMC/Ext/Root/Pos`` (name, p.xyz,
q.xyzw, ...) and ``/VMC/Ext/Bone/Pos`` (Unity ``HumanBodyBones`` name, local position
p.xyz, local rotation q.xyzw) in Unity's left-handed Y-up frame (x right, y up, z forward).
OSC is decoded with ``python-osc``. See :func:`vmc_to_smpl` for the conversion.

Torch-free.
"""
from __future__ import annotations

import argparse
import math
import random
import socket
import struct
import sys
import threading
import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.spatial.transform import Rotation

from fmgs.errors import FmgsInputError, run_cli

__all__ = [
    "MAGIC",
    "VERSION",
    "PACKET_SIZE",
    "UP_CODES",
    "PosePacket",
    "PacketError",
    "encode_pose",
    "decode_pose",
    "PoseStreamState",
    "UdpPoseReceiver",
    "VMC_BONES",
    "VmcState",
    "VmcReceiver",
    "vmc_to_smpl",
    "parse_stream_url",
    "open_receiver",
    "send_motion",
    "stream_main",
]

MAGIC = b"FMGP"
VERSION = 1
NUM_JOINTS = 24
UP_CODES = ("+x", "-x", "+y", "-y", "+z", "-z")
_HEAD = struct.Struct("<4sBBHIId")
_BODY = struct.Struct(f"<{NUM_JOINTS * 3 + 3}f")
_CRC = struct.Struct("<I")
PACKET_SIZE = _HEAD.size + _BODY.size + _CRC.size  # 328
_MAX_ANGLE = 1.0e3
_MAX_TRANS = 1.0e4


class PacketError(ValueError):
    """A datagram that is not a valid pose packet; ``kind`` is the counter it goes to
    (``malformed``, ``nonfinite`` or ``invalid``)."""

    def __init__(self, kind: str, msg: str):
        super().__init__(msg)
        self.kind = kind


@dataclass
class PosePacket:
    """A decoded pose packet.

    Attributes:
        poses: (24, 3) float64 SMPL axis-angle, radians.
        trans: (3,) float64 root translation, metres.
        seq: sequence number; stream: stream id; timestamp: sender time, s (epoch).
        up: the pose world's up axis (one of :data:`UP_CODES`).
        received: receiver's ``time.time()`` at arrival (set by the receiver).
    """

    poses: np.ndarray
    trans: np.ndarray
    seq: int
    stream: int
    timestamp: float
    up: str = "+y"
    received: float = 0.0


def encode_pose(poses: np.ndarray, trans: np.ndarray, seq: int, stream: int, timestamp: float | None = None,
                up: str = "+y") -> bytes:
    """Pack one SMPL pose as a version-1 packet (layout in the module docstring).

    Args:
        poses: (24, 3) or (72,) axis-angle, radians. trans: (3,) metres.
        seq: sequence number (0..2^32-1). stream: stream id (0..2^32-1).
        timestamp: seconds since the epoch (default ``time.time()``).
        up: the up axis of the pose's world (:data:`UP_CODES`).

    Returns:
        :data:`PACKET_SIZE` bytes.
    """
    p = np.asarray(poses, np.float64).reshape(-1)
    t = np.asarray(trans, np.float64).reshape(-1)
    if p.size != NUM_JOINTS * 3 or t.size != 3:
        raise ValueError(f"encode_pose: poses must hold 72 values and trans 3, got {p.size} and {t.size}")
    head = _HEAD.pack(MAGIC, VERSION, UP_CODES.index(up), NUM_JOINTS, int(seq) & 0xFFFFFFFF,
                      int(stream) & 0xFFFFFFFF, time.time() if timestamp is None else float(timestamp))
    body = _BODY.pack(*p.tolist(), *t.tolist())
    return head + body + _CRC.pack(zlib.crc32(head + body))


def decode_pose(data: bytes) -> PosePacket:
    """Unpack and validate a packet.

    Raises:
        PacketError: ``malformed`` (size, magic, version, joint count, up code, CRC),
            ``nonfinite`` (NaN/inf in the pose, translation or timestamp) or ``invalid``
            (angles > 1e3 rad or translation > 1e4 m).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise PacketError("malformed", f"not bytes: {type(data).__name__}")
    data = bytes(data)
    if len(data) != PACKET_SIZE:
        raise PacketError("malformed", f"{len(data)} bytes, expected {PACKET_SIZE}")
    magic, version, up, nj, seq, stream, ts = _HEAD.unpack_from(data, 0)
    if magic != MAGIC:
        raise PacketError("malformed", f"bad magic {magic!r}")
    if version != VERSION:
        raise PacketError("malformed", f"unsupported version {version}")
    if nj != NUM_JOINTS or up >= len(UP_CODES):
        raise PacketError("malformed", f"joint count {nj} / up code {up}")
    (crc,) = _CRC.unpack_from(data, PACKET_SIZE - 4)
    if zlib.crc32(data[:PACKET_SIZE - 4]) != crc:
        raise PacketError("malformed", "CRC mismatch")
    vals = np.asarray(_BODY.unpack_from(data, _HEAD.size), np.float64)
    if not (np.isfinite(vals).all() and math.isfinite(ts)):
        raise PacketError("nonfinite", "NaN or inf in the pose, translation or timestamp")
    poses, trans = vals[:72].reshape(NUM_JOINTS, 3), vals[72:]
    if np.abs(poses).max() > _MAX_ANGLE or np.abs(trans).max() > _MAX_TRANS:
        raise PacketError("invalid", "pose angle or translation out of range")
    return PosePacket(poses=poses, trans=trans, seq=int(seq), stream=int(stream), timestamp=float(ts),
                      up=UP_CODES[up])


_COUNTERS = ("packets", "accepted", "malformed", "nonfinite", "invalid", "late", "stale", "restarts", "errors")


@dataclass
class PoseStreamState:
    """Receiver logic for pose packets, independent of the socket (see module docstring).

    Thread-safe: :meth:`feed` runs on the receiving thread, :meth:`latest` /
    :meth:`wait_new` on the player's.
    """

    counts: dict[str, int] = field(default_factory=lambda: {k: 0 for k in _COUNTERS})
    _stream: int | None = None
    _seq: int = -1
    _retired: deque = field(default_factory=lambda: deque(maxlen=64))
    _latest: PosePacket | None = None
    _gen: int = 0
    _cv: threading.Condition = field(default_factory=threading.Condition)

    def feed(self, data: bytes, received: float | None = None) -> str:
        """Process one datagram; returns the counter it went to (``accepted`` or a reason).
        Never raises."""
        try:
            with self._cv:
                self.counts["packets"] += 1
            try:
                pkt = decode_pose(data)
            except PacketError as exc:
                with self._cv:
                    self.counts[exc.kind] += 1
                return exc.kind
            pkt.received = time.time() if received is None else float(received)
            return self._accept(pkt)
        except Exception:  # pragma: no cover - defensive: network input must never crash the player
            with self._cv:
                self.counts["errors"] += 1
            return "errors"

    def _accept(self, pkt: PosePacket) -> str:
        with self._cv:
            if pkt.stream != self._stream:
                if pkt.stream in self._retired:
                    self.counts["stale"] += 1
                    return "stale"
                if self._stream is not None:
                    self._retired.append(self._stream)
                    self.counts["restarts"] += 1
                self._stream, self._seq = pkt.stream, -1
            if pkt.seq <= self._seq:
                self.counts["late"] += 1
                return "late"
            self._seq = pkt.seq
            self._latest = pkt
            self._gen += 1
            self.counts["accepted"] += 1
            self._cv.notify_all()
            return "accepted"

    def latest(self) -> tuple[int, PosePacket | None]:
        """(generation, newest accepted packet or None); the generation counts accepted packets."""
        with self._cv:
            return self._gen, self._latest

    def wait_new(self, generation: int, timeout: float) -> tuple[int, PosePacket | None]:
        """Block until a packet newer than ``generation`` is accepted or ``timeout`` s pass."""
        with self._cv:
            self._cv.wait_for(lambda: self._gen != generation, timeout=timeout)
            return self._gen, self._latest

    def summary(self) -> str:
        c = self.counts
        return ", ".join(f"{k} {c[k]}" for k in _COUNTERS if k == "packets" or c.get(k))


class _UdpThread:
    """A UDP socket read by a daemon thread that feeds a state object."""

    def __init__(self, state, host: str, port: int):
        self.state = state
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        except OSError:
            pass
        try:
            self.sock.bind((host, int(port)))
        except OSError as exc:
            self.sock.close()
            raise FmgsInputError(f"cannot listen on udp://{host}:{port}: {exc}") from exc
        self.address = self.sock.getsockname()
        self.sock.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fmgs-pose-rx", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, _ = self.sock.recvfrom(65536)
            except socket.timeout:
                continue
            except OSError:
                if self._stop.is_set():
                    break
                continue
            self.state.feed(data, time.time())

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class UdpPoseReceiver(_UdpThread):
    """Listen for pose packets on ``host:port`` (UDP) in a background thread.

    Attributes:
        state: the :class:`PoseStreamState` (counters, newest pose).
        address: the bound (host, port) (``port=0`` picks a free one).

    Raises:
        FmgsInputError: the address cannot be bound.
    """

    def __init__(self, host: str, port: int):
        super().__init__(PoseStreamState(), host, port)


# --------------------------------------------------------------------------- VMC
#: Unity ``HumanBodyBones`` names -> SMPL joint index (VMC ``/VMC/Ext/Bone/Pos``).
VMC_BONES: dict[str, int] = {
    "Hips": 0, "LeftUpperLeg": 1, "RightUpperLeg": 2, "Spine": 3, "LeftLowerLeg": 4, "RightLowerLeg": 5,
    "Chest": 6, "LeftFoot": 7, "RightFoot": 8, "UpperChest": 9, "LeftToes": 10, "RightToes": 11,
    "Neck": 12, "LeftShoulder": 13, "RightShoulder": 14, "Head": 15, "LeftUpperArm": 16,
    "RightUpperArm": 17, "LeftLowerArm": 18, "RightLowerArm": 19, "LeftHand": 20, "RightHand": 21,
}


def _unity_quat_to_rh(q_xyzw: np.ndarray) -> np.ndarray:
    """A Unity rotation quaternion (left-handed frame: x right, y up, z forward) expressed in
    the frame with x mirrored (x = the avatar's left, SMPL's body axes): conjugating by the
    reflection ``diag(-1, 1, 1)`` gives ``(x, y, z, w) -> (x, -y, -z, w)``."""
    q = np.asarray(q_xyzw, np.float64)
    return np.array([q[0], -q[1], -q[2], q[3]])


def vmc_to_smpl(bones: dict[str, tuple[np.ndarray, np.ndarray]], root: tuple[np.ndarray, np.ndarray] | None,
                rest_joints: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Convert VMC humanoid bone transforms to an SMPL pose (Y-up player world).

    VMC (protocol.vmc.info, "Bone/Pos", "Root/Pos") sends each Unity humanoid bone's local
    position and local rotation (quaternion x, y, z, w) relative to its parent bone, in
    Unity's left-handed frame (x right, y up, z forward), for a normalised avatar whose
    rest pose is the T-pose with identity local rotations (as VRM models and VMC senders
    use). SMPL's rest pose is that T-pose too, with x = the body's left, y up, z forward, so
    a Unity rotation becomes SMPL's by mirroring x: quaternion ``(x, y, z, w) -> (x, -y,
    -z, w)``, position ``(x, y, z) -> (-x, y, z)``. Bones map by :data:`VMC_BONES`
    (Spine/Chest/UpperChest -> spine1/2/3; an avatar without UpperChest leaves spine3 at
    rest, which composes the same chain). SMPL's hand joints (22, 23) stay at rest.

    The global orientation is ``R_root R_hips``; the pelvis sits at ``p_root + R_root
    p_hips`` (Unity's Root/Pos position and the Hips' local position, mirrored), so
    ``trans = pelvis - rest_joints[0]``.

    Args:
        bones: {Unity bone name: (position (3,), quaternion xyzw (4,))}, Unity frame.
        root: (position, quaternion) of ``/VMC/Ext/Root/Pos`` or None (identity).
        rest_joints: (24, 3) SMPL rest joints (metres); default: pelvis at the origin.

    Returns:
        poses: (24, 3) float64 axis-angle; trans: (3,) float64 metres.
    """
    rv = np.zeros((NUM_JOINTS, 3))
    for name, (_, q) in bones.items():
        k = VMC_BONES.get(name)
        if k is None:
            continue
        rv[k] = Rotation.from_quat(_unity_quat_to_rh(q)).as_rotvec()
    r_root = Rotation.identity()
    p_root = np.zeros(3)
    if root is not None:
        r_root = Rotation.from_quat(_unity_quat_to_rh(root[1]))
        p_root = np.asarray(root[0], np.float64) * np.array([-1.0, 1.0, 1.0])
    hips_p = np.zeros(3)
    hips_r = Rotation.identity()
    if "Hips" in bones:
        hips_p = np.asarray(bones["Hips"][0], np.float64) * np.array([-1.0, 1.0, 1.0])
        hips_r = Rotation.from_quat(_unity_quat_to_rh(bones["Hips"][1]))
    rv[0] = (r_root * hips_r).as_rotvec()
    pelvis = p_root + r_root.apply(hips_p)
    j0 = np.zeros(3) if rest_joints is None else np.asarray(rest_joints, np.float64).reshape(-1, 3)[0]
    return rv, pelvis - j0


class VmcState(PoseStreamState):
    """Receiver logic for VMC datagrams (OSC messages or bundles).

    Every datagram that updates a bone or the root publishes a new pose (seq = datagram
    count; VMC carries no sequence number, so order is arrival order); undecodable OSC or
    bone messages with wrong arguments / non-finite values count ``malformed`` /
    ``nonfinite``; other addresses are ignored (``ignored``).
    """

    def __init__(self, rest_joints: np.ndarray | None = None):
        super().__init__()
        self.counts["ignored"] = 0
        self.rest_joints = rest_joints
        self.bones: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.root: tuple[np.ndarray, np.ndarray] | None = None
        self._n = 0

    @staticmethod
    def _transform(args: list[Any]) -> tuple[str, np.ndarray, np.ndarray]:
        if len(args) < 8 or not isinstance(args[0], str):
            raise PacketError("malformed", "expected (name, px, py, pz, qx, qy, qz, qw)")
        try:
            v = np.array([float(a) for a in args[1:8]], np.float64)
        except (TypeError, ValueError):
            raise PacketError("malformed", "non-numeric bone values") from None
        if not np.isfinite(v).all():
            raise PacketError("nonfinite", "NaN or inf bone values")
        if np.linalg.norm(v[3:]) < 1e-6 or np.abs(v[:3]).max() > _MAX_TRANS:
            raise PacketError("invalid", "zero quaternion or absurd position")
        return args[0], v[:3], v[3:] / np.linalg.norm(v[3:])

    def feed(self, data: bytes, received: float | None = None) -> str:
        try:
            from pythonosc.osc_packet import OscPacket

            with self._cv:
                self.counts["packets"] += 1
            try:
                msgs = [m.message for m in OscPacket(bytes(data)).messages]
            except Exception:  # python-osc raises ParseError and assorted decoding errors
                with self._cv:
                    self.counts["malformed"] += 1
                return "malformed"
            changed = False
            for msg in msgs:
                addr = msg.address
                if addr not in ("/VMC/Ext/Bone/Pos", "/VMC/Ext/Root/Pos"):
                    with self._cv:
                        self.counts["ignored"] += 1
                    continue
                try:
                    name, p, q = self._transform(list(msg.params))
                except PacketError as exc:
                    with self._cv:
                        self.counts[exc.kind] += 1
                    continue
                if addr == "/VMC/Ext/Root/Pos":
                    self.root = (p, q)
                else:
                    self.bones[name] = (p, q)
                changed = True
            if not changed:
                return "ignored"
            poses, trans = vmc_to_smpl(self.bones, self.root, self.rest_joints)
            self._n += 1
            now = time.time() if received is None else float(received)
            pkt = PosePacket(poses=poses, trans=trans, seq=self._n, stream=0, timestamp=now, up="+y", received=now)
            return self._accept(pkt)
        except Exception:  # pragma: no cover - defensive
            with self._cv:
                self.counts["errors"] += 1
            return "errors"

    def summary(self) -> str:
        keys = ("packets", "accepted", "malformed", "nonfinite", "invalid", "ignored", "errors")
        return ", ".join(f"{k} {self.counts[k]}" for k in keys if k == "packets" or self.counts.get(k))


class VmcReceiver(_UdpThread):
    """Listen for VMC (OSC over UDP) on ``host:port``; see :class:`VmcState`."""

    def __init__(self, host: str, port: int, rest_joints: np.ndarray | None = None):
        super().__init__(VmcState(rest_joints), host, port)


# --------------------------------------------------------------------------- URLs
def parse_stream_url(url: str) -> tuple[str, str, int]:
    """``udp://HOST:PORT`` or ``vmc://HOST:PORT`` -> (scheme, host, port).

    Raises:
        FmgsInputError: another scheme, a missing host or a port outside 0..65535.
    """
    s = str(url)
    if "://" not in s:
        raise FmgsInputError(f"not a stream address: {url!r} (expected udp://HOST:PORT or vmc://HOST:PORT)")
    scheme, rest = s.split("://", 1)
    scheme = scheme.lower()
    if scheme not in ("udp", "vmc"):
        raise FmgsInputError(f"unsupported stream scheme {scheme!r} in {url!r}: expected udp:// or vmc://")
    host, sep, port = rest.rstrip("/").rpartition(":")
    if not sep or not host:
        raise FmgsInputError(f"stream address {url!r} needs HOST:PORT")
    try:
        p = int(port)
    except ValueError:
        raise FmgsInputError(f"stream address {url!r}: port {port!r} is not a number") from None
    if not 0 <= p <= 65535:
        raise FmgsInputError(f"stream address {url!r}: port {p} is outside 0..65535")
    return scheme, host.strip("[]"), p


def open_receiver(url: str, rest_joints: np.ndarray | None = None):
    """A running :class:`UdpPoseReceiver` (``udp://``) or :class:`VmcReceiver` (``vmc://``)."""
    scheme, host, port = parse_stream_url(url)
    if scheme == "vmc":
        return VmcReceiver(host, port, rest_joints)
    return UdpPoseReceiver(host, port)


# --------------------------------------------------------------------------- sender
def _garbage(rng: random.Random, good: bytes) -> tuple[str, bytes]:
    """A malformed datagram of one of several kinds (for robustness tests)."""
    kind = rng.choice(["random", "truncated", "bitflip", "nan", "foreign"])
    if kind == "random":
        return kind, bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 400)))
    if kind == "truncated":
        return kind, good[: rng.randint(0, len(good) - 1)]
    if kind == "bitflip":
        b = bytearray(good)
        i = rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(8)
        return kind, bytes(b)
    if kind == "nan":  # valid CRC, NaN pose: rejected as non-finite
        head = good[:_HEAD.size]
        vals = list(_BODY.unpack_from(good, _HEAD.size))
        vals[rng.randrange(len(vals))] = float("nan")
        body = _BODY.pack(*vals)
        return kind, head + body + _CRC.pack(zlib.crc32(head + body))
    return kind, b"GET / HTTP/1.1\r\nHost: example\r\n\r\n"


def send_motion(motion, host: str, port: int, fps: float | None = None, loop: bool = False,
                duration: float | None = None, corrupt: float = 0.0, seed: int = 0,
                stream: int | None = None, log=None, stop: threading.Event | None = None) -> dict:
    """Replay a :class:`fmgs.motion.Motion` as pose packets in real time.

    Frame ``k`` is sent at ``start + k / fps`` (wall clock, ``time.perf_counter``), stamped
    with ``time.time()`` when sent. With ``corrupt = p``, each frame is preceded, with
    probability p, by a malformed datagram (:func:`_garbage`: random bytes, truncation, a
    flipped bit, a NaN with a valid CRC, foreign text), so a fraction ``p / (1 + p)`` of
    all datagrams is bad.

    Args:
        motion: the motion (resampled to ``fps`` if given).
        host, port: the receiver.
        fps: send rate (default the motion's).
        loop: start over at the end (until ``duration``).
        duration: stop after this many seconds (default: one pass).
        corrupt: probability of a malformed datagram per frame.
        seed: random seed of the corruption.
        stream: stream id (default random).
        log: optional printer.
        stop: optional event that ends the replay early.

    Returns:
        {"sent": valid pose packets, "bad": malformed datagrams, "bad_kinds": {...},
        "stream": id, "seconds": wall time, "fps": rate}.
    """
    from fmgs.motion import resample_motion, world_from_up

    if fps is not None and abs(float(fps) - motion.fps) > 1e-9:
        motion = resample_motion(motion, float(fps))
    rate = motion.fps
    wfm = np.asarray(motion.world_from_motion)
    up_vec = wfm[:3, :3].T @ np.array([0.0, 1.0, 0.0])
    k = int(np.argmax(np.abs(up_vec)))
    up = ("+" if up_vec[k] > 0 else "-") + "xyz"[k]
    if not np.allclose(world_from_up(up), wfm, atol=1e-9):
        raise FmgsInputError("the motion's world rotation is not an axis-aligned up mapping", motion.source)
    rng = random.Random(seed)
    sid = random.SystemRandom().getrandbits(32) if stream is None else int(stream)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sent = bad = 0
    kinds: dict[str, int] = {}
    t0 = time.perf_counter()
    n = motion.num_frames
    i = 0
    try:
        while True:
            if stop is not None and stop.is_set():
                break
            if not loop and i >= n:
                break
            due = t0 + i / rate
            if duration is not None and due - t0 >= duration:
                break
            now = time.perf_counter()
            if due > now:
                time.sleep(due - now)
            f = i % n
            pkt = encode_pose(motion.poses[f], motion.trans[f], seq=i, stream=sid, up=up)
            if corrupt > 0 and rng.random() < corrupt:
                kind, junk = _garbage(rng, pkt)
                kinds[kind] = kinds.get(kind, 0) + 1
                sock.sendto(junk, (host, int(port)))
                bad += 1
            sock.sendto(pkt, (host, int(port)))
            sent += 1
            i += 1
    finally:
        sock.close()
    res = {"sent": sent, "bad": bad, "bad_kinds": kinds, "stream": sid, "seconds": time.perf_counter() - t0,
           "fps": rate}
    if log:
        log(f"fmgs-stream: sent {sent} poses at {rate:g} fps in {res['seconds']:.1f} s"
            + (f", plus {bad} malformed datagrams {kinds}" if bad else "") + f" (stream id {sid:#010x})")
    return res


def stream_main(argv: list[str] | None = None) -> int:
    """``fmgs-stream MOTION --to udp://HOST:PORT``: replay a motion file as a live pose stream.

    Any file :func:`fmgs.motion.load_motion` reads (AMASS, AIST++, SMPL, BVH, ASF/AMC,
    retargeted) is sent in real time as version-1 pose packets. Exit codes: 0, 2 bad input.
    """
    ap = argparse.ArgumentParser(prog="fmgs-stream", description=stream_main.__doc__.splitlines()[0])
    ap.add_argument("motion", help="motion file (AMASS/AIST++/SMPL .npz/.npy/.pkl, .bvh, .amc)")
    ap.add_argument("--to", required=True, help="receiver address udp://HOST:PORT")
    ap.add_argument("--fps", type=float, default=None, help="send rate; the motion is resampled to it")
    ap.add_argument("--loop", action="store_true", help="start over at the end")
    ap.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    ap.add_argument("--source-fps", type=float, default=None, help="the file's frame rate if it stores none")
    ap.add_argument("--up", default=None, help="the file's up axis (+y, +z, ..., auto)")
    ap.add_argument("--joint-map", default=None, help="skeleton files: preset or YAML/JSON map")
    ap.add_argument("--corrupt", type=float, default=0.0,
                    help="testing: probability per frame of also sending a malformed datagram")
    ap.add_argument("--seed", type=int, default=0, help="testing: seed of --corrupt")
    args = ap.parse_args(argv)

    def go():
        from fmgs.motion import load_motion

        scheme, host, port = parse_stream_url(args.to)
        if scheme != "udp":
            raise FmgsInputError(f"fmgs-stream sends udp:// pose packets, not {scheme}://")
        if not 0.0 <= args.corrupt < 1.0:
            raise FmgsInputError(f"--corrupt must be in [0, 1), got {args.corrupt}")
        if args.duration is not None and not (math.isfinite(args.duration) and args.duration > 0):
            raise FmgsInputError(f"--duration must be a positive number of seconds, got {args.duration}")
        import warnings

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            m = load_motion(args.motion, fps=args.fps, source_fps=args.source_fps, up=args.up,
                            joint_map=args.joint_map)
        for w in caught:
            print(f"fmgs-stream: warning: {w.message}", file=sys.stderr)
        for line in m.notes:
            print(f"fmgs-stream: {line}")
        print(f"fmgs-stream: {m.kind} {m.num_frames} frames at {m.fps:g} fps -> {args.to}", flush=True)
        send_motion(m, host, port, loop=args.loop, duration=args.duration, corrupt=args.corrupt, seed=args.seed,
                    log=lambda s: print(s, flush=True))

    return run_cli(go, prog="fmgs-stream")


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(stream_main())
