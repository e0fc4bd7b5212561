"""Live pose stream end to end: fmgs-stream (a separate process) -> UDP 127.0.0.1 -> fmgs-play
headless (CPU renderer) -> MP4, measuring pose-to-pixels latency.

The player side runs :func:`fmgs.runtime.live.run_live_headless` on a bundle (the renderer
is warmed up first: its first frame compiles the numba kernels); once warm, the sender
process(es) start: ``fmgs-stream MOTION --to udp://127.0.0.1:PORT --fps F --loop
--duration S``. Latency of a frame = wall time when its image has been appended to the
video minus the timestamp the sender put in the packet (same machine, same clock).

Scenarios (``--scenario``):

* ``clean``: one sender for ``--seconds``.
* ``faults``: two senders one after the other (``--seconds / 2`` each; the second is a
  restarted process with a new stream id; the gap between them is its start-up time, during
  which the player holds the last pose; the player stops 20 s after the last pose), each
  also sending malformed datagrams with probability ``p`` per frame (``--bad 0.05`` of
  all datagrams: ``p = bad / (1 - bad)``).

Usage:
    python benchmarks/bench_live.py BUNDLE --scenario clean --seconds 60 --json runs/live_clean.json
    python benchmarks/bench_live.py BUNDLE --scenario faults --seconds 60 --json runs/live_faults.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from fmgs.paths import data_root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--motion", default=str(data_root() / "motion" / "cmu_fairmotion" / "01_01.bvh"))
    ap.add_argument("--scenario", choices=("clean", "faults"), default="clean")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--fps", type=float, default=30.0)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--bad", type=float, default=0.05, help="faults: fraction of malformed datagrams")
    ap.add_argument("--port", type=int, default=39571)
    ap.add_argument("--render-threads", type=int, default=None)
    ap.add_argument("--out", default="/tmp/bench_live.mp4")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from fmgs.pose_stream import UdpPoseReceiver
    from fmgs.runtime.live import run_live_headless
    from fmgs.runtime.pipeline import AvatarPipeline

    pipeline = AvatarPipeline(args.bundle)
    rx = UdpPoseReceiver("127.0.0.1", args.port)
    stream = [sys.executable, "-m", "fmgs.pose_stream", args.motion, "--to", f"udp://127.0.0.1:{args.port}",
              "--fps", str(args.fps), "--loop"]
    logs: list[str] = []
    sender_runs: list[dict] = []

    def senders() -> None:
        if args.scenario == "clean":
            plan = [(args.seconds, 0.0, 1)]
        else:
            p = args.bad / (1.0 - args.bad)
            plan = [(args.seconds / 2, p, 1), (args.seconds / 2, p, 2)]
        for dur, p, seed in plan:
            t0 = time.time()
            r = subprocess.run(stream + ["--duration", str(dur), "--corrupt", str(p), "--seed", str(seed)],
                               capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
            logs.append(r.stdout + r.stderr)
            sender_runs.append({"wall_s": time.time() - t0, "rc": r.returncode, "log": r.stdout.strip().splitlines()[-1:]})

    th = threading.Thread(target=senders, daemon=True)
    player_args = dict(pipeline=pipeline, width=args.size, height=args.size, renderer="cpu",
                       threads=args.render_threads)
    try:
        res = run_live_headless(player_args, rx.state, args.out, fps=args.fps, idle_exit=20.0, first_wait=120.0,
                                on_ready=th.start)
    finally:
        th.join(timeout=args.seconds + 60)
        rx.close()
    sent = bad = 0
    for text in logs:
        for line in text.splitlines():
            if "fmgs-stream: sent" in line:
                w = line.split()
                sent += int(w[2])
                if "malformed" in line:
                    bad += int(w[w.index("plus") + 1])
    res.pop("shown_seq", None)
    out = {"scenario": args.scenario, "seconds": args.seconds, "fps": args.fps, "size": args.size,
           "poses_sent": sent, "malformed_sent": bad, "senders": sender_runs, "player": res,
           "load_avg": os.getloadavg(), "cpus": os.cpu_count()}
    print(json.dumps({k: v for k, v in out.items() if k != "senders"}, indent=1, default=float))
    for text in logs:
        print(text.strip())
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1, default=float))


if __name__ == "__main__":
    main()
