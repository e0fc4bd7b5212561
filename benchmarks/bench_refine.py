"""Seconds per frame of the test-time pose refinement, with and without the frozen-avatar cache.

    python benchmarks/bench_refine.py RUN_DIR [--split val] [--frames 3] [--steps 80]
        [--objective silhouette|image] [--rounds 2] [--set KEY=VALUE ...]

Refines the first ``--frames`` frames of the split (``refine_frame_pose``, the
``fmgs-eval --refine-poses`` step) inside :meth:`AvatarModel.frozen`, once with its cache of the
pose-independent parts (what ``fmgs-eval`` does) and once with every part recomputed at every
step (the behaviour before the cache), alternated ``--rounds`` times, and prints the median
seconds per frame of each and whether the refined poses agree (they must be identical: the
cache changes no value). Timing only: run it on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--split", choices=("test", "val", "train"), default="val")
    ap.add_argument("--frames", type=int, default=3)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--objective", choices=("silhouette", "image"), default="silhouette")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    a = ap.parse_args(argv)

    from fmgs.errors import FmgsInputError
    from fmgs.trainer.engine.refine import RefineSettings, refine_frame_pose
    from fmgs.trainer.engine.run import load_run
    from fmgs.trainer.models.base import AvatarModel

    if a.frames < 1 or a.steps < 1 or a.rounds < 1:
        print(f"bench_refine: --frames, --steps and --rounds must be >= 1 (got {a.frames}, {a.steps}, {a.rounds})",
              file=sys.stderr)
        return 2
    try:
        run = load_run(a.run_dir, tuple(a.overrides), split=a.split)
    except FmgsInputError as exc:
        print(f"bench_refine: {exc}", file=sys.stderr)
        return 2
    frames = [run.seq[i] for i in range(min(a.frames, len(run.seq)))]
    settings = RefineSettings(iterations=a.steps, photometric=0.0 if a.objective == "silhouette" else 1.0)
    cached = AvatarModel._pose_independent

    def uncached(self, key, compute):
        return compute()

    with run.model.frozen():      # warm-up (first-call allocations), not timed
        refine_frame_pose(run.model, run.setup, frames[0], run.cfg, RefineSettings(iterations=2, photometric=0.0))
    times = {"cached": [], "uncached": []}
    poses = {}
    for _ in range(a.rounds):
        for mode in ("uncached", "cached"):
            AvatarModel._pose_independent = cached if mode == "cached" else uncached
            t0 = time.perf_counter()
            with run.model.frozen():
                poses[mode] = [refine_frame_pose(run.model, run.setup, fr, run.cfg, settings)[0].poses
                               for fr in frames]
            times[mode].append((time.perf_counter() - t0) / len(frames))
    AvatarModel._pose_independent = cached
    same = all(np.array_equal(p, q) for p, q in zip(poses["cached"], poses["uncached"]))
    med = {k: float(np.median(v)) for k, v in times.items()}
    print(f"{a.run_dir} ({run.model.kind}, {run.model.num_surfels} surfels), {len(frames)} {a.split} frames, "
          f"{a.steps} steps, {a.objective}: uncached {med['uncached']:.1f} s/frame, cached {med['cached']:.1f} "
          f"s/frame ({med['uncached'] / med['cached']:.2f}x); rounds {times}; refined poses identical: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
