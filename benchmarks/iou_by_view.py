"""Silhouette IoU of training vs test frames at the same view of the body (issue 17's
loose-garment goal: "IoU on the PeopleSnapshot test frames at least as high as on training frames").

    python benchmarks/iou_by_view.py SEQ TRAIN_EVAL_DIR TEST_EVAL_DIR [--bins 8]

PeopleSnapshot subjects turn in place in front of a fixed camera, so a frame's difficulty
depends on which side of the body faces the camera (profile views show arms against the
torso, the back shows the hair). This bins the per-frame IoU of two ``fmgs-eval`` outputs
(``metrics.json`` with per-frame records, e.g. ``--split train --out RUN/eval_train_all`` and
the test split's ``RUN/eval``) by the body's facing angle, the yaw of SMPL's forward axis
(+z of the body frame, rotated by ``Rh`` of ``SEQ/mesh_infos.pkl`` and the camera's
extrinsics) about the camera's vertical axis: 0 deg faces the camera, +-180 deg shows the back.
Prints a markdown table per bin and the training IoU re-weighted to the test frames' bin
counts ("view-matched"), so the two means compare the same mix of views.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy.spatial.transform import Rotation

from fmgs.pickle_io import load_pickle


def facing_deg(seq: Path) -> dict[str, float]:
    """``{frame name: facing angle in degrees, (-180, 180]}`` of a HumanNeRF-layout sequence."""
    meshes = load_pickle(seq / "mesh_infos.pkl")
    cams = load_pickle(seq / "cameras.pkl")
    out = {}
    for name, m in meshes.items():
        R_cam = np.asarray(cams[name]["extrinsics"], np.float64)[:3, :3]
        fwd = R_cam @ Rotation.from_rotvec(np.asarray(m["Rh"], np.float64).reshape(3)).as_matrix() @ [0.0, 0.0, 1.0]
        out[name] = float(np.degrees(np.arctan2(fwd[0], -fwd[2])))   # toward the camera = -z (OpenCV)
    return out


def per_frame(eval_dir: Path) -> dict[str, float]:
    """``{frame name: silhouette IoU}`` from the per-frame records of ``EVAL_DIR/metrics.json``."""
    recs = json.loads((eval_dir / "metrics.json").read_text())["frames"]
    return {r["frame"]: float(r["silhouette_iou"]) for r in recs}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("seq", type=Path)
    ap.add_argument("train_eval", type=Path)
    ap.add_argument("test_eval", type=Path)
    ap.add_argument("--bins", type=int, default=8)
    args = ap.parse_args(argv)
    for p in (args.seq / "mesh_infos.pkl", args.train_eval / "metrics.json", args.test_eval / "metrics.json"):
        if not p.is_file():
            print(f"{p}: missing", file=sys.stderr)
            return 2
    angle = facing_deg(args.seq)
    width = 360.0 / args.bins

    def binned(ious: dict[str, float], eval_dir: Path):
        missing = sorted(set(ious) - set(angle))
        if missing:
            raise SystemExit(f"{eval_dir / 'metrics.json'}: frames not in {args.seq / 'mesh_infos.pkl'}: {missing[:3]}")
        b = [[] for _ in range(args.bins)]
        for name, v in ious.items():       # bin k is centred on k * width (0 = facing the camera)
            b[int(np.floor(angle[name] / width + 0.5)) % args.bins].append(v)
        return b

    tr = binned(per_frame(args.train_eval), args.train_eval)
    te = binned(per_frame(args.test_eval), args.test_eval)
    print("| facing (deg) | train frames | train IoU | test frames | test IoU |\n| --- | --- | --- | --- | --- |")
    for k in sorted(range(args.bins), key=lambda k: (k * width + 180.0) % 360.0):   # from the back, -180 first
        centre = (k * width + 180.0) % 360.0 - 180.0
        mt = f"{np.mean(tr[k]):.3f}" if tr[k] else "-"
        ms = f"{np.mean(te[k]):.3f}" if te[k] else "-"
        print(f"| {centre:+.0f} | {len(tr[k])} | {mt} | {len(te[k])} | {ms} |")
    all_tr = [v for b in tr for v in b]
    all_te = [v for b in te for v in b]
    shared = [k for k in range(args.bins) if tr[k] and te[k]]
    matched = sum(np.mean(tr[k]) * len(te[k]) for k in shared) / max(1, sum(len(te[k]) for k in shared))
    test_shared = np.mean([v for k in shared for v in te[k]])
    print(f"\ntrain IoU {np.mean(all_tr):.4f} ({len(all_tr)} frames), test IoU {np.mean(all_te):.4f} "
          f"({len(all_te)} frames); over the views both have: train view-matched {matched:.4f}, "
          f"test {test_shared:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
