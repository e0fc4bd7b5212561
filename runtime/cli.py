"""``fmgs-play BUNDLE MOTION``: play a motion clip on an exported avatar (torch-free).

Examples::

    fmgs-play runs/demo/bundle ../shared/data/motion/amass_samples/amass_repo__amass_sample.npz
    fmgs-play BUNDLE MOTION --headless --out clip.mp4 --size 512 --fps 30 --mode rgb
    fmgs-play BUNDLE MOTION --headless --out frames/ --frames 60 --mode semantic
    fmgs-play BUNDLE take.bvh --joint-map rig.yaml        # BVH / ASF-AMC, retargeted to SMPL
    fmgs-play BUNDLE udp://0.0.0.0:9870 [--headless --out live.mp4 --duration 60]   # live stream

Without a display (no ``$DISPLAY``, or GLFW cannot open an OpenGL 4.3 window) the player
says so and renders headless to ``--out`` (default ``<motion stem>.mp4``). At exit it
prints the frame-time statistics (mean, p95) and the per-stage split.

Renderers (``--renderer``): ``gl`` draws the surfels with OpenGL (a GPU, or Mesa's llvmpipe
through EGL headless); ``cpu`` splats them with numba kernels, front to back with the 2DGS
early stop (:mod:`fmgs.runtime.splat_cpu`); ``auto`` takes ``cpu`` whenever OpenGL would run
on the CPU anyway (headless, or a software window context) and numba is installed.

Exit codes: 0 success, 2 bad input (message names the file), 3 no OpenGL available.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from fmgs.errors import FmgsInputError, run_cli

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``fmgs-play`` argument parser."""
    from fmgs.runtime.gl_renderer import MODES

    p = argparse.ArgumentParser(prog="fmgs-play", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", help="bundle folder written by fmgs-export")
    p.add_argument("motion", help="motion file: AMASS .npz, AIST++ .pkl/.npz, SMPL (T,72) .npy/.npz, .bvh, .amc; "
                                  "or a live stream udp://HOST:PORT (fmgs-stream packets) / vmc://HOST:PORT (VMC)")
    p.add_argument("--headless", action="store_true", help="render offscreen to --out (no window)")
    p.add_argument("--out", default=None, help="clip.mp4 or frames/ (headless; default <motion>.mp4)")
    p.add_argument("--size", type=int, nargs="+", default=[512], metavar="PX",
                   help="render size: one value (square) or WIDTH HEIGHT (default 512)")
    p.add_argument("--fps", type=float, default=30.0, help="display rate; the motion is resampled to it (30)")
    p.add_argument("--frames", type=int, default=None, help="headless: number of frames (default: whole clip)")
    p.add_argument("--mode", choices=MODES, default="rgb", help="render mode (default rgb)")
    p.add_argument("--speed", type=float, default=1.0, help="window: initial playback speed")
    p.add_argument("--background", type=float, nargs=3, default=(1.0, 1.0, 1.0), metavar=("R", "G", "B"),
                   help="background colour in [0, 1] (default white)")
    p.add_argument("--precision", choices=("f4", "f2", "f1"), default="f4",
                   help="colour render-target format: f4 float32 (default; exact, as fast as f2 on "
                        "llvmpipe), f2 half, f1 8-bit")
    p.add_argument("--cull-backfaces", type=float, default=None, metavar="COS",
                   help="speed-up: skip surfels facing away from the camera (cos > COS, e.g. 0.3); "
                        "off by default (exact 2DGS)")
    p.add_argument("--fast", action="store_true",
                   help="approximate speed-up preset: back-face culling (cos > 0.3) on the CPU; "
                        "changes the image (semi-transparent surfels seen from behind vanish; "
                        "measured PSNR in fmgs.runtime.app.FAST_CULL_COS). Default: the exact 2DGS image")
    p.add_argument("--renderer", choices=("auto", "gl", "cpu"), default="auto",
                   help="surfel renderer: gl (OpenGL), cpu (numba: front to back with 2DGS early stop; "
                        "about a third of llvmpipe's CPU time) or auto (default: cpu when OpenGL would run "
                        "on the CPU anyway -- headless, or a software context -- else gl)")
    p.add_argument("--render-threads", type=int, default=None, metavar="N",
                   help="threads of the cpu renderer (default: all cores)")
    p.add_argument("--no-follow", action="store_true", help="do not keep the camera on the body")
    p.add_argument("--no-view-dependence", action="store_true",
                   help="feed the canonical view direction to the colour model (pose-only colour)")
    p.add_argument("--arrays", choices=("auto", "numpy", "cupy"), default="auto", help="array back-end")
    p.add_argument("--inference", choices=("auto", "onnxruntime", "tensorrt"), default="auto",
                   help="model back-end (TensorRT engines when present and CUDA works)")
    p.add_argument("--providers", choices=("auto", "cpu", "cuda", "tensorrt"), default="auto",
                   help="ONNX Runtime provider preference")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    p.add_argument("--up", default=None, help="the motion file's up axis (+y, +z, ..., auto)")
    p.add_argument("--source-fps", type=float, default=None, help="the motion file's frame rate if it stores none")
    p.add_argument("--joint-map", default=None, help="BVH/AMC: joint map preset or YAML/JSON {smpl_joint: source_joint}")
    p.add_argument("--duration", type=float, default=None, help="live stream, headless: stop after this many seconds")
    return p


#: Render sizes accepted by ``--size`` (pixels per side).
SIZE_RANGE = (16, 8192)
#: Display / resampling rates accepted by ``--fps`` and ``--source-fps`` (frames per second);
#: the motion is resampled to ``--fps``, so an absurd rate would allocate absurd arrays.
FPS_RANGE = (0.1, 1000.0)
#: How to get the optional back-ends.
INSTALL_HINTS = {"cupy": "pip install cupy-cuda12x (needs an NVIDIA GPU and driver)",
                 "tensorrt": "pip install tensorrt cupy-cuda12x (needs an NVIDIA GPU), and export the bundle "
                             "with TensorRT engines (fmgs-export --trt on)"}


def validate_args(args) -> tuple[int, int]:
    """Check every ``fmgs-play`` option before any work starts; return ``(width, height)``.

    Rules: ``--size`` one or two integers in :data:`SIZE_RANGE`; a video ``--out`` (H.264
    needs even sizes) rejects odd sizes with the nearest even ones suggested (PNG frames
    and the window take any size); ``--frames`` >= 1; ``--fps`` / ``--source-fps`` finite
    in :data:`FPS_RANGE`; ``--speed``, ``--background`` (in [0, 1]) and
    ``--cull-backfaces`` (in [-1, 1]) finite; thread counts >= 1; ``--arrays cupy`` and
    ``--inference tensorrt`` only when that back-end works here ("not installed: how to get
    it" otherwise).

    Raises:
        FmgsInputError: one line naming the option and what is wrong (exit status 2).
    """
    import math

    if len(args.size) not in (1, 2):
        raise FmgsInputError(f"--size takes one or two values (WIDTH [HEIGHT]), got {len(args.size)}")
    width, height = (int(args.size[0]),) * 2 if len(args.size) == 1 else (int(v) for v in args.size)
    lo, hi = SIZE_RANGE
    if not (lo <= width <= hi and lo <= height <= hi):
        raise FmgsInputError(f"--size must be {lo}..{hi} pixels per side, got {width}x{height}")
    video = args.out is None or not _is_frames_out(args.out)
    if video and str(args.out or ".mp4").lower().endswith((".mp4", ".mkv", ".mov", ".avi", ".webm")) \
            and (width % 2 or height % 2):
        ev = lambda v: v + (v % 2)  # noqa: E731
        raise FmgsInputError(f"--size {width}x{height}: H.264 video needs even width and height; use "
                             f"--size {ev(width)} {ev(height)}, or write PNG frames (--out frames/)")
    if args.frames is not None and args.frames < 1:
        raise FmgsInputError(f"--frames must be at least 1, got {args.frames}")
    for opt, v in (("--fps", args.fps), ("--source-fps", args.source_fps)):
        if v is not None and not (math.isfinite(v) and FPS_RANGE[0] <= v <= FPS_RANGE[1]):
            raise FmgsInputError(f"{opt} must be a rate in {FPS_RANGE[0]:g}..{FPS_RANGE[1]:g} frames per second, "
                                 f"got {v:g}")
    if not math.isfinite(args.speed):
        raise FmgsInputError(f"--speed must be a finite number, got {args.speed}")
    if not all(math.isfinite(c) and 0.0 <= c <= 1.0 for c in args.background):
        raise FmgsInputError(f"--background takes R G B in [0, 1], got {list(args.background)}")
    if args.cull_backfaces is not None and not (-1.0 <= args.cull_backfaces <= 1.0):
        raise FmgsInputError(f"--cull-backfaces is a cosine in [-1, 1], got {args.cull_backfaces}")
    for opt, v in (("--threads", args.threads), ("--render-threads", args.render_threads)):
        if v is not None and v < 1:
            raise FmgsInputError(f"{opt} must be at least 1, got {v}")
    if args.arrays == "cupy":
        from fmgs.runtime.xp import cupy_status

        ok, why = cupy_status()
        if not ok:
            raise FmgsInputError(f"--arrays cupy: not available ({why}); install: {INSTALL_HINTS['cupy']}")
    if args.inference == "tensorrt":
        from fmgs.runtime.inference import tensorrt_status

        ok, why = tensorrt_status()
        if not ok:
            raise FmgsInputError(f"--inference tensorrt: not available ({why}); install: "
                                 f"{INSTALL_HINTS['tensorrt']}")
    return width, height


def _is_frames_out(out: str) -> bool:
    from fmgs.runtime.app import is_frames_dir

    return is_frames_dir(out)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fmgs-play``; returns the exit code."""
    args = build_parser().parse_args(argv)
    return run_cli(lambda: _run(args), prog="fmgs-play")


def _run(args) -> int:
    from fmgs.motion import load_motion
    from fmgs.runtime.app import NO_DISPLAY, run_headless, run_window
    from fmgs.runtime.pipeline import AvatarPipeline

    width, height = validate_args(args)
    if not Path(args.bundle).exists():
        raise FmgsInputError("bundle folder not found", args.bundle)
    pipeline = AvatarPipeline(args.bundle, array_backend=args.arrays, inference_backend=args.inference,
                              providers=args.providers, threads=args.threads,
                              view_dependent=not args.no_view_dependence)
    if args.motion.startswith(("udp://", "vmc://")):
        from fmgs.runtime.live import run_live

        print(f"fmgs-play: {pipeline.describe()}")
        live_args = dict(pipeline=pipeline, width=width, height=height, mode=args.mode,
                         background=tuple(args.background), precision=args.precision,
                         follow=not args.no_follow, cull_backfaces=args.cull_backfaces, fast=args.fast,
                         renderer=args.renderer, threads=args.render_threads)
        return run_live(live_args, args.motion, rest_joints=pipeline.rest_joints, headless=args.headless,
                        out=args.out, fps=args.fps, duration=args.duration, frames=args.frames,
                        err=lambda s: print(s, file=sys.stderr))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        motion = load_motion(args.motion, fps=args.fps, source_fps=args.source_fps, up=args.up,
                             rest_joints=pipeline.rest_joints, joint_map=args.joint_map)
    for w in caught:
        print(f"fmgs-play: warning: {w.message}", file=sys.stderr)
    for line in motion.notes:
        print(f"fmgs-play: {line}")
    print(f"fmgs-play: {pipeline.describe()}")
    print(f"fmgs-play: motion {motion.kind} {motion.num_frames} frames at {motion.fps:g} fps ({args.motion})")
    player_args = dict(pipeline=pipeline, motion=motion, width=width, height=height, mode=args.mode,
                       background=tuple(args.background), precision=args.precision,
                       follow=not args.no_follow, cull_backfaces=args.cull_backfaces, fast=args.fast,
                       renderer=args.renderer, threads=args.render_threads)
    if not args.headless:
        res = run_window(player_args)
        if res != NO_DISPLAY:
            return 0
        print("fmgs-play: no display available; falling back to headless rendering", file=sys.stderr)
    out = args.out or f"{Path(args.motion).stem}.mp4"
    try:
        res = run_headless(player_args, out, frames=args.frames)
    except RuntimeError as exc:
        print(f"fmgs-play: error: {exc}", file=sys.stderr)
        return 3
    print(f"fmgs-play: wrote {res['out']}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
