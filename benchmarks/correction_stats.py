"""Could a held-out frame get a pose correction? Statistics of a full-model run's learnt ones.

    python benchmarks/correction_stats.py RUN_DIR [--folds 5] [--json OUT.json]

A ``model.kind=full`` run learns one SMPL pose correction per training frame
(``pose_correction.delta``, ``(F, 24, 3)`` axis-angle, radians; :class:`PoseCorrection`).
Held-out frames are posed without one. This reports whether anything in the corrections could
be carried to a frame that was not trained on (issue 17, eighth round):

1. **size**: mean |component| (degrees) and the mean over the frames (the constant part that
   a held-out frame would miss; :func:`numpy.mean` per component, then |.| averaged);
2. **time**: correlation of the corrections (constant part removed) between training frames
   ``lag`` apart, for lags 1, 2, 4, 8 (in training frames, i.e. ``data.train_step`` video frames);
3. **pose**: ridge regression from the frame's 72 SMPL pose parameters (plus a bias) to its 72
   correction components, cross-validated over ``--folds`` contiguous blocks of the training
   frames, at ridge weights 0.1, 1, 10, 100: R^2 = 1 - SSE / SS about the training blocks' mean.
   Near 0 or below: the correction is not a function of the pose.

Bad input (not a run, not a full-model run, a run without a per-frame correction) is reported
in one line, exit status 2. Reads poses only: no image is decoded.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def ridge_cv_r2(X: np.ndarray, Y: np.ndarray, lam: float, folds: int) -> float:
    """Cross-validated R^2 of ridge regression ``Y ~ [X, 1]`` over contiguous blocks.

    Args:
        X: (N, D) float64 inputs; Y: (N, K) float64 targets; lam: ridge weight (>= 0, the bias
            is penalised too); folds: number of contiguous blocks (2 <= folds <= N).
    Returns:
        ``1 - sum of squared prediction errors / sum of squares about each fold's training mean``.
    """
    n = len(X)
    sse = sst = 0.0
    for te in np.array_split(np.arange(n), folds):
        tr = np.setdiff1d(np.arange(n), te)
        A = np.c_[X[tr], np.ones(len(tr))]
        W = np.linalg.solve(A.T @ A + lam * np.eye(A.shape[1]), A.T @ Y[tr])
        pred = np.c_[X[te], np.ones(len(te))] @ W
        sse += float(((pred - Y[te]) ** 2).sum())
        sst += float(((Y[te] - Y[tr].mean(0)) ** 2).sum())
    return 1.0 - sse / sst


def lag_correlation(D: np.ndarray, lag: int) -> float:
    """Correlation of ``D[t]`` and ``D[t + lag]`` over all components, the per-component mean
    removed first. D: (N, K); 1 <= lag < N."""
    Dc = D - D.mean(0)
    a, b = Dc[:-lag], Dc[lag:]
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)

    from fmgs.errors import FmgsInputError
    from fmgs.trainer.engine.run import load_run, open_sequence

    try:
        run = load_run(a.run_dir, (), split="val")
        if run.kind != "full":
            raise FmgsInputError(f"not a full-model run (model.kind={run.kind})", a.run_dir)
        pc = run.model.pose_correction
        if pc is None or pc.every != 1:
            raise FmgsInputError("the run has no per-frame pose correction "
                                 "(model.full.pose_correction=false or pose_correction_every > 1)", a.run_dir)
        train = open_sequence(run.cfg, "train")             # poses only: no image is decoded
        if not 2 <= a.folds <= len(train):
            raise FmgsInputError(f"--folds must be in [2, {len(train)}], got {a.folds}")
    except FmgsInputError as exc:
        print(f"correction_stats: {exc}", file=sys.stderr)
        return 2
    D = pc.delta.detach().double().numpy().reshape(len(train), -1)
    P = np.stack([train.smpl_params(n)["poses"].astype(np.float64) for n in train.names])
    rep = {"run": str(a.run_dir), "frames": len(train),
           "mean_abs_deg": float(np.degrees(np.abs(D)).mean()),
           "abs_mean_deg": float(np.degrees(np.abs(D.mean(0))).mean()),
           "lag_correlation": {lag: lag_correlation(D, lag) for lag in (1, 2, 4, 8) if lag < len(D)},
           "ridge_cv_r2": {lam: ridge_cv_r2(P, D, lam, a.folds) for lam in (0.1, 1.0, 10.0, 100.0)}}
    print(f"{a.run_dir}: {rep['frames']} training frames; |correction| {rep['mean_abs_deg']:.3f} deg per "
          f"component, |mean over frames| {rep['abs_mean_deg']:.3f} deg")
    print("correlation at lag " + ", ".join(f"{k}: {v:+.2f}" for k, v in rep["lag_correlation"].items()))
    print(f"ridge pose -> correction, {a.folds}-fold contiguous CV R^2: "
          + ", ".join(f"lambda {k:g}: {v:+.3f}" for k, v in rep["ridge_cv_r2"].items()))
    if a.json:
        a.json.write_text(json.dumps(rep, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
