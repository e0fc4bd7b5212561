"""Parity of the runtime frame with the trainer's render of the same avatar.

For a few training frames of a run, renders (a) the trainer's avatar (``fmgs.export.bake``
rebuilds it exactly as ``fmgs-eval``) with the CPU 2DGS rasteriser and (b) the run's
bundle through the torch-free runtime (pipeline + OpenGL renderer through EGL, with
float32 / half / 8-bit targets, and the numba CPU renderer: ``--precisions cpu``), in the
dataset's own camera, and reports the PSNR between the two (white background, full image,
8-bit runtime image), also with back-face culling (the runtime's optional speed-up).

Usage:
    python benchmarks/parity_play.py RUN_DIR BUNDLE --frames 3 --size 512 --precisions f4 f2 f1 cpu
"""
from __future__ import annotations

import argparse
from types import SimpleNamespace
import sys

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("bundle")
    ap.add_argument("--frames", type=int, default=3)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--cull", type=float, nargs="*", default=[0.7], help="back-face culling thresholds to try")
    ap.add_argument("--precisions", nargs="*", default=["f4", "f2", "f1", "cpu"],
                    help="GL colour targets (f4, f2, f1) and/or 'cpu' (the numba renderer)")
    args = ap.parse_args(argv)

    import torch

    from fmgs.export.bake import training_poses
    from fmgs.trainer.engine.run import load_run
    from fmgs.runtime.gl_renderer import SurfelRenderer, create_headless_context
    from fmgs.runtime.pipeline import AvatarPipeline
    from fmgs.runtime.splat_cpu import CpuSurfelRenderer
    from fmgs.trainer.render.dispatch import render_posed

    # the trainer reference renders on the CPU rasteriser, whatever device the run trained on
    run = load_run(args.run_dir, ["train.backend=cpu", "train.device=cpu"], device="cpu")
    pipe = AvatarPipeline(args.bundle, array_backend="numpy")
    ctx = create_headless_context()
    seq = run.seq
    results = {}
    for pose in training_poses(run, args.frames):
        cam = seq.camera(pose["name"])
        cam = cam.scaled(args.size / cam.width).without_distortion()
        with torch.no_grad():
            frame = SimpleNamespace(poses=pose["poses"], world_from_body=pose["world_from_body"], camera=cam)
            ref = render_posed(run.model.pose(frame, run.setup), cam, background=(1.0, 1.0, 1.0), backend="cpu")
        ref_img = ref.rgb.numpy().clip(0, 1)
        for prec in args.precisions:
            for cull in [None, *args.cull]:
                r = (CpuSurfelRenderer(cam.width, cam.height, pipe.S) if prec == "cpu" else
                     SurfelRenderer(ctx, cam.width, cam.height, pipe.S, precision=prec))
                pipe.init_table(r.table)
                pipe.frame(pose["poses"].reshape(24, 3), pose["world_from_body"], cam.center, table=r.table)
                r.draw(cam.K, cam.viewmat, mode="rgb", cull_backfaces=cull, background=(1.0, 1.0, 1.0))
                r.resolve("rgb", background=(1.0, 1.0, 1.0))
                img = r.read_display().astype(np.float64) / 255.0
                psnr = 10 * np.log10(1.0 / np.mean((img - ref_img) ** 2))
                results.setdefault((prec, cull), []).append(psnr)
                r.release()
    print(f"{run.kind} avatar, {pipe.S} surfels, {args.frames} training frames at {args.size}px ({args.run_dir})")
    for (prec, cull), v in results.items():
        print(f"  {'cpu renderer' if prec == 'cpu' else 'GL target ' + prec} cull {cull}: PSNR runtime vs trainer mean {np.mean(v):.2f} dB, min {np.min(v):.2f} dB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
