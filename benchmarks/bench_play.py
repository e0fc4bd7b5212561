"""Benchmark of the torch-free runtime (fmgs-play): frame rate and per-stage split.

Renders a motion on a bundle headless (EGL; Mesa llvmpipe on a CPU-only machine) exactly
as ``fmgs-play --headless`` does, minus the video encoding: per frame pose -> inference ->
skinning -> sort -> draw + resolve + read-back of the 8-bit image, consecutive frames
overlapped (:meth:`Player.render_pipelined`; ``--sync`` renders each frame on its own).
Reports the end-to-end FPS (frames / wall time), mean and p95 frame time, the mean split per
stage, the process CPU time per frame (all threads, incl. llvmpipe's and ONNX Runtime's) and
the load average at the start (other processes compete for the same cores).

``--isolate N`` (for a shared, loaded machine) also times every stage on its own, N times,
and reports per-stage medians of the wall time and of the process CPU time (all threads):
pose / inference / skinning (:meth:`AvatarPipeline.frame` on consecutive frames), sort
(coherent, consecutive frames), draw (submit + shading + resolve + read-back of one
frame). CPU time is the robust number when other jobs share the cores: under load the wall
time of a ``nice``-d process stretches by whatever the scheduler gives the others.

``--synthetic-full N`` times a randomised *full* avatar (pose encoder + geometry + colour
ONNX models) on N-level subdivided SMPL surfels (1 -> 55,104 surfels) built with torch
(tests/runtime_avatar.py), for machines without a trained full-model bundle;
``--save-bundle DIR`` keeps it for later runs.

``--no-ort-spin`` turns ONNX Runtime's intra-op thread spinning off (session config
``session.intra_op.allow_spinning = 0``) for this benchmark: spinning worker threads burn the
cores that llvmpipe and NumPy need on a 2-core machine. (The runtime's own
``fmgs.runtime.inference.OrtModel`` does not set it.)

Usage:
    python benchmarks/bench_play.py BUNDLE MOTION --size 512 --frames 120 [--isolate 15] [--fast]
    python benchmarks/bench_play.py --synthetic-full 1 MOTION --size 512 --save-bundle /tmp/b55k
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _no_ort_spin() -> None:
    """Make every later ``onnxruntime.SessionOptions()`` disable intra-op spinning."""
    import onnxruntime as ort

    base = ort.SessionOptions

    class _Options(base):
        def __init__(self):
            super().__init__()
            self.add_session_config_entry("session.intra_op.allow_spinning", "0")

    ort.SessionOptions = _Options


def _median_times(fn, n: int) -> tuple[float, float]:
    """(median wall ms, median process-CPU ms) of ``n`` calls of ``fn(k)``."""
    wall, cpu = [], []
    for k in range(n):
        c0, t0 = time.process_time(), time.perf_counter()
        fn(k)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return 1e3 * float(np.median(wall)), 1e3 * float(np.median(cpu))


def isolate_stages(player, n: int, start: int) -> dict:
    """Per-stage medians (wall ms, CPU ms) of ``n`` repeats, each stage timed on its own."""
    from fmgs.runtime.pipeline import FrameTimings

    pipe, r, m = player.pipeline, player.renderer, player.motion
    out = {}
    stage = {"pose": [], "inference": [], "skinning": [], "cpu": []}
    for k in range(n):
        i = (start + k) % m.num_frames
        tm = FrameTimings()
        c0 = time.process_time()
        pipe.frame(m.poses[i], m.world_from_body(i), player.camera.eye, table=r.table, timings=tm)
        stage["cpu"].append(time.process_time() - c0)
        for s in ("pose", "inference", "skinning"):
            stage[s].append(getattr(tm, s))
    for s in ("pose", "inference", "skinning"):
        out[s] = {"wall_ms": 1e3 * float(np.median(stage[s]))}
    out["pipeline_cpu_ms"] = 1e3 * float(np.median(stage["cpu"]))
    # consecutive frames' tables for the coherent sort
    tables = []
    for k in range(n + 1):
        i = (start + k) % m.num_frames
        pipe.frame(m.poses[i], m.world_from_body(i), player.camera.eye, table=r.table)
        tables.append(r.table.copy())
    V, K = player.camera.viewmat(), player.camera.K()
    r.table[:] = tables[0]
    r.sort(V, cull_backfaces=player.cull_backfaces)
    walls, cpus = [], []
    for k in range(n):
        r.table[:] = tables[k + 1]
        c0, t0 = time.process_time(), time.perf_counter()
        order = r.sort(V, cull_backfaces=player.cull_backfaces)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    out["sort"] = {"wall_ms": 1e3 * float(np.median(walls)), "cpu_ms": 1e3 * float(np.median(cpus))}

    def draw(_k):
        r.draw(K, V, mode=player.mode, order=order, background=player.background,
               primitive=player.primitive, alpha_min=player.alpha_min)
        r.resolve(player.mode, background=player.background)
        r.read_display()

    draw(0)
    w, c = _median_times(draw, n)
    out["draw"] = {"wall_ms": w, "cpu_ms": c, "primitive": r.last_primitive, "drawn": int(len(order))}
    out["sum_wall_ms"] = sum(out[s]["wall_ms"] for s in ("pose", "inference", "skinning", "sort", "draw"))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", nargs="?", help="bundle folder (omit with --synthetic-full)")
    ap.add_argument("motion", help="motion file")
    ap.add_argument("--synthetic-full", type=int, default=None, metavar="SUBDIV",
                    help="build a randomised full bundle on SMPL subdivided SUBDIV times (needs torch + SMPL)")
    ap.add_argument("--save-bundle", default=None, metavar="DIR", help="where to write the synthetic bundle")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--frames", type=int, default=120)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--mode", default="rgb")
    ap.add_argument("--precision", default="f4", choices=("f4", "f2", "f1"))
    ap.add_argument("--primitive", default="auto", choices=("auto", "points", "quads"))
    ap.add_argument("--renderer", default="auto", choices=("auto", "gl", "cpu"),
                    help="surfel renderer (auto: the numba CPU renderer on a software GL context)")
    ap.add_argument("--render-threads", type=int, default=None, help="threads of the CPU renderer (default: all)")
    ap.add_argument("--cull-backfaces", type=float, default=None, metavar="COS")
    ap.add_argument("--fast", action="store_true", help="the approximate fast preset (Player(fast=True))")
    ap.add_argument("--sync", action="store_true", help="do not overlap consecutive frames")
    ap.add_argument("--isolate", type=int, default=0, metavar="N",
                    help="also time each stage on its own N times (medians of wall and CPU time)")
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    ap.add_argument("--no-ort-spin", action="store_true", help="disable ONNX Runtime's thread spinning")
    ap.add_argument("--arrays", default="auto")
    ap.add_argument("--inference", default="auto", choices=("auto", "onnxruntime", "tensorrt"),
                    help="model back-end (AvatarPipeline inference_backend)")
    ap.add_argument("--providers", default="auto", choices=("auto", "cpu", "cuda", "tensorrt"),
                    help="ONNX Runtime provider preference")
    ap.add_argument("--json", default=None, help="also write the summary here")
    args = ap.parse_args(argv)

    if args.no_ort_spin:
        _no_ort_spin()
    from fmgs.motion import load_motion
    from fmgs.runtime.app import Player, format_stats, summarize
    from fmgs.runtime.gl_renderer import create_headless_context
    from fmgs.runtime.pipeline import AvatarPipeline

    bundle = args.bundle
    if args.synthetic_full is not None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from fmgs.paths import smpl_neutral_path
        from runtime_avatar import build_small_avatar, export_small_bundle

        model, surfels = build_small_avatar(smpl_neutral_path(), subdivisions=args.synthetic_full)
        dest = Path(args.save_bundle) if args.save_bundle else Path(tempfile.mkdtemp()) / "bundle"
        bundle = export_small_bundle(model, surfels, dest)
        print(f"synthetic bundle: {bundle}")
    load = os.getloadavg()
    pipe = AvatarPipeline(bundle, array_backend=args.arrays, inference_backend=args.inference,
                          providers=args.providers, threads=args.threads)
    motion = load_motion(args.motion, fps=30.0, source_fps=30.0 if args.motion.endswith(".npy") else None)
    # the CPU renderer needs no OpenGL (GPU machines may lack the EGL loader)
    ctx = None if args.renderer == "cpu" else create_headless_context()
    player = Player(pipe, motion, ctx, args.size, args.size, mode=args.mode, precision=args.precision,
                    cull_backfaces=args.cull_backfaces, fast=args.fast, primitive=args.primitive,
                    renderer=args.renderer, threads=args.render_threads)
    step = player.render if args.sync else player.render_pipelined
    for i in range(args.warmup):
        step(i)
    player.flush()
    player.stats.clear()
    c0, t0 = time.process_time(), time.perf_counter()
    for i in range(args.frames):
        step(args.warmup + i)
    player.flush()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(pipe.describe())
    print(f"renderer {player.renderer.kind}, GL: {ctx.info['GL_RENDERER'] if ctx else 'none'} | {args.size}x{args.size} {args.mode} precision {args.precision} "
          f"primitive {player.renderer.last_primitive} cull {player.cull_backfaces} fast {args.fast} "
          f"{'sync' if args.sync else 'overlapped'} ort-spin {'off' if args.no_ort_spin else 'default'} | "
          f"load average at start {load[0]:.2f} on {os.cpu_count()} cores")
    print(format_stats(player.stats, wall, label="bench_play: "))
    print(f"process CPU time: {1e3 * cpu / args.frames:.1f} ms per frame (all threads)")
    res = summarize(player.stats, wall)
    res.update(renderer=player.renderer.kind, surfels=pipe.S, size=args.size, mode=args.mode, precision=args.precision, fast=args.fast,
               primitive=player.renderer.last_primitive, overlapped=not args.sync, ort_spin=not args.no_ort_spin,
               cpu_ms_per_frame=1e3 * cpu / args.frames, loadavg=load[0], describe=pipe.describe())
    if args.isolate:
        iso = isolate_stages(player, args.isolate, args.warmup + args.frames)
        res["isolated"] = iso
        parts = " | ".join(f"{s} {iso[s]['wall_ms']:.2f}" + (f" (cpu {iso[s]['cpu_ms']:.2f})" if "cpu_ms" in iso[s] else "")
                           for s in ("pose", "inference", "skinning", "sort", "draw"))
        print(f"isolated medians of {args.isolate} (ms): {parts}; pipeline CPU {iso['pipeline_cpu_ms']:.2f}; "
              f"sum of walls {iso['sum_wall_ms']:.1f} -> {1e3 / iso['sum_wall_ms']:.1f} FPS sequential; "
              f"draw primitive {iso['draw']['primitive']}, {iso['draw']['drawn']} surfels drawn; "
              f"load average now {os.getloadavg()[0]:.2f}")
    if args.json:
        from fmgs.atomic import write_json_atomic

        write_json_atomic(args.json, res)
    else:
        print(json.dumps({k: v for k, v in res.items() if k not in ("describe", "isolated")}, indent=None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
