"""Play a live pose stream (``udp://`` pose packets or ``vmc://``) on a bundle's avatar.

The player always renders the newest pose received (:mod:`fmgs.pose_stream`); when the
sender pauses the last pose holds. Headless, a frame is rendered and written for each new
pose the renderer gets to (poses that arrive while a frame is being drawn are skipped, the
newest wins); the pose-to-pixels latency of each frame is the time from the packet's
timestamp (sender clock) to the moment its frame has been written. In a window the
stream is drawn continuously (the window loop of :func:`fmgs.runtime.app.run_window`).
At exit the receiver's counters (packets, accepted, malformed, non-finite, late, stale,
restarts) and the latency statistics are printed.
"""
from __future__ import annotations

import time

import numpy as np

from fmgs.motion import world_from_up

__all__ = ["LiveMotion", "run_live_headless", "run_live"]


class LiveMotion:
    """A one-frame stand-in for :class:`fmgs.motion.Motion` that reads the newest pose.

    :class:`fmgs.runtime.app.Player` reads ``poses[i]`` then ``world_from_body(i)``; reading
    ``poses`` takes a snapshot of the receiver's newest packet, which ``world_from_body``
    then uses, so a frame never mixes two packets. Before the first packet the body is in
    SMPL's rest pose at the origin.
    """

    def __init__(self, state, fps: float = 30.0):
        self.state = state
        self.fps = float(fps)
        self.num_frames = 1
        self.source = "live"
        self.kind = "live"
        self.notes: list[str] = []
        self.packet = None
        self.generation = -1

    def snapshot(self):
        self.generation, self.packet = self.state.latest()
        return self.packet

    @property
    def poses(self) -> np.ndarray:
        pkt = self.snapshot()
        if pkt is None:
            return np.zeros((1, 24, 3))
        return pkt.poses[None]

    @property
    def trans(self) -> np.ndarray:
        return np.zeros((1, 3)) if self.packet is None else self.packet.trans[None]

    @property
    def world_from_motion(self) -> np.ndarray:
        return world_from_up(self.packet.up if self.packet is not None else "+y")

    def world_from_body(self, t: int) -> np.ndarray:
        m = np.eye(4)
        if self.packet is not None:
            m[:3, 3] = self.packet.trans
        return self.world_from_motion @ m


def run_live_headless(player_args: dict, state, out, fps: float = 30.0, duration: float | None = None,
                      frames: int | None = None, idle_exit: float | None = 5.0, first_wait: float = 30.0,
                      log=print, on_ready=None) -> dict:
    """Render a live stream headless into ``out`` (mp4 or frames folder).

    Args:
        player_args: :class:`fmgs.runtime.app.Player` keyword arguments except ``motion``
            and ``ctx`` (a :class:`LiveMotion` of ``state`` is the motion).
        state: a :class:`fmgs.pose_stream.PoseStreamState` fed by a receiver.
        out: output path.
        fps: frame rate written into the video file.
        duration: stop after this many seconds from the first pose (None: no limit).
        frames: stop after this many frames (None: no limit).
        idle_exit: stop when no new pose came for this many seconds (None: never).
        first_wait: give up when no pose came within this many seconds.
        log: printer.
        on_ready: optional callable run once the renderer is warm, before the first pose is
            awaited (e.g. to start a test sender).

    Returns:
        {"frames", "latency_ms": {"p50","p95","mean","max"}, "counts", "fps", "wall", "out"}.
    """
    from fmgs.runtime.app import Player, _Sink, choose_renderer, format_stats, summarize
    from fmgs.runtime.gl_renderer import create_headless_context

    live = LiveMotion(state, fps=fps)
    args = dict(player_args, motion=live)
    ctx = None
    if choose_renderer(args.get("renderer", "auto"), None) == "gl":
        ctx = create_headless_context()
    # build the player and draw one frame before listening matters: the renderer's first
    # frame compiles its kernels (seconds), which must not count as stream latency
    player = Player(ctx=ctx, **args)
    player.render(0)
    player.stats.clear()
    if on_ready is not None:
        on_ready()
    t_start = time.perf_counter()
    gen, pkt = state.wait_new(-1 if state.latest()[1] is not None else 0, first_wait)
    if pkt is None:
        log(f"fmgs-play: no pose arrived within {first_wait:g} s")
        return {"frames": 0, "counts": dict(state.counts), "wall": time.perf_counter() - t_start, "out": None}
    live.snapshot()
    player.camera = player._frame_camera(player.renderer.width, player.renderer.height)  # face the first pose
    player._home = (player.camera.distance, player.camera.azimuth, player.camera.elevation)
    gen = -1  # render the first pose too
    sink = _Sink(out, live.fps)
    lat: list[float] = []
    t_first = None
    t_last = t_start
    ok = False
    shown_seq = []
    try:
        while True:
            new_gen, pkt = state.wait_new(gen, 0.25)
            now = time.perf_counter()
            if new_gen == gen:
                if t_first is not None and idle_exit is not None and now - t_last > idle_exit:
                    log(f"fmgs-play: no new pose for {idle_exit:g} s; stopping")
                    break
                if t_first is not None and duration is not None and now - t_first >= duration:
                    break
                continue
            gen = new_gen
            if t_first is None:
                t_first = now
            t_last = now
            img = player.render(0)
            used = live.packet
            gen = max(gen, live.generation)
            sink.write(img)
            t_done = time.time()
            t_done_pc = time.perf_counter()
            if used is not None:
                lat.append(t_done - used.timestamp)
                shown_seq.append(used.seq)
            if frames is not None and len(lat) >= frames:
                break
            if duration is not None and time.perf_counter() - t_first >= duration:
                break
        ok = True
    finally:
        sink.close(ok)
    # the active span: first pose to last frame written (not the idle wait at the end)
    wall = (t_done_pc - t_first) if lat else time.perf_counter() - t_start
    res = {"frames": len(lat), "counts": dict(state.counts), "wall": wall, "out": str(out),
           "shown_seq": shown_seq}
    if lat:
        a = np.asarray(lat) * 1e3
        res["latency_ms"] = {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
                             "mean": float(a.mean()), "max": float(a.max())}
        res["fps"] = len(lat) / wall if wall > 0 else 0.0
        res["render"] = summarize(player.stats, wall)
        log(format_stats(player.stats, wall, label=f"live headless {player.renderer.width}x{player.renderer.height}: "))
        log(f"pose-to-pixels latency: p50 {res['latency_ms']['p50']:.1f} ms, p95 {res['latency_ms']['p95']:.1f} ms, "
            f"max {res['latency_ms']['max']:.1f} ms over {len(lat)} frames")
    log(f"stream: {state.summary()}; frames shown {len(lat)}")
    return res


def run_live(player_args: dict, url: str, rest_joints=None, headless: bool = False, out=None, fps: float = 30.0,
             duration: float | None = None, frames: int | None = None, log=print, err=print) -> int:
    """``fmgs-play BUNDLE udp://HOST:PORT`` / ``vmc://HOST:PORT``: listen and play.

    Returns the exit code (0; 3 when the headless OpenGL renderer is unavailable).
    """
    from fmgs.pose_stream import open_receiver
    from fmgs.runtime.app import NO_DISPLAY, run_window

    rx = open_receiver(url, rest_joints=rest_joints)
    log(f"fmgs-play: listening on {url} (bound {rx.address[0]}:{rx.address[1]})")
    try:
        if not headless:
            live = LiveMotion(rx.state, fps=fps)
            res = run_window(dict(player_args, motion=live), title=f"fmgs-play {url}", log=log)
            if res != NO_DISPLAY:
                log(f"stream: {rx.state.summary()}")
                return 0
            err("fmgs-play: no display available; falling back to headless rendering")
        target = out or "live.mp4"
        try:
            res = run_live_headless(player_args, rx.state, target, fps=fps, duration=duration, frames=frames,
                                    log=log)
        except RuntimeError as exc:
            err(f"fmgs-play: error: {exc}")
            return 3
        if res["out"] is not None:
            log(f"fmgs-play: wrote {res['out']}")
        else:
            log(f"fmgs-play: nothing written; stream: {rx.state.summary()}")
        return 0
    finally:
        rx.close()
