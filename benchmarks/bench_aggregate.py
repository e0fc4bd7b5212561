"""Instant-avatar aggregation on ZJU-MoCap 377: wall time per stage, preview
quality per frame subsampling, and mesh vs surfel visibility.

Part 1, for each ``--steps`` value (``init.frame_step``: use every n-th training frame),
one :func:`fmgs.trainer.init.aggregate.aggregate_sequence` run over the 455 training frames at
512^2 (``visibility: mesh``), split into stages (seconds, summed over frames):

* ``frame``: cached uint8 image -> float frame (background composite);
* ``pose``: bone transforms + NumPy LBS of 55,104 surfel centres/normals (+ mesh vertices
  are posed inside ``depth``);
* ``depth``: the visibility depth map (z-buffer of the posed upsampled mesh);
* ``visibility``: projection, facing, mask and depth tests;
* ``sample``: bilinear colours and weights of the visible surfels;
* ``fuse``: robust weighted mean over all observations; ``fill``: neighbour diffusion.

Image decoding (``load``, shared with training) is reported apart. With ``--eval-frames
N`` the preview avatar of each run is scored on the first N held-out frames (23 = the
whole test split; PSNR/SSIM, full image, black background, as ``fmgs-eval``).

Part 2 (``--compare-frames N``, evenly spaced training frames): per-frame time of the two
visibility depth maps, ``mesh`` (:func:`mesh_depth_map`) and ``surfels``
(:func:`surfel_depth_map`: 2DGS median depth, CPU rasteriser), their depth agreement
(median |difference| where both are finite) and the agreement of the visible-surfel sets
(Jaccard index per frame).

Usage:
    python benchmarks/bench_aggregate.py --steps 1,5,25 --eval-frames 23 --compare-frames 10 \
        --threads 2 --json runs/bench_aggregate.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from fmgs.body_model import lbs_points
from fmgs.config import InitConfig
from fmgs.trainer.init import aggregate as ag
from fmgs.config import load_config
from fmgs.trainer.models.base import frame_bone_transforms
from fmgs.trainer.engine.run import build_setup, open_sequence


def stage_timings(cfg, setup, seq, steps, eval_frames):
    test_seq = open_sequence(cfg, "test") if eval_frames else None
    rows = []
    for step in steps:
        acfg = InitConfig(**{**ag.aggregate_config(cfg).__dict__, "frame_step": step})
        res = ag.aggregate_sequence(setup, seq, acfg, progress=False)
        row = {"frame_step": step, **res.summary()}
        if eval_frames:
            model = ag.PreviewAvatar(setup.surfels, res.colors, float(cfg.surfels.init_opacity))
            ev = ag.evaluate_preview(model, setup, test_seq, cfg, eval_frames)
            row["heldout"] = {k: ev[k] for k in ("num_frames", "psnr", "ssim")}
        rows.append(row)
        t = row["timings_s"]
        print(f"frame_step {step:3d}: {row['frames']:3d} frames, total {t['total']:6.2f} s = "
              + ", ".join(f"{k} {t[k]:.2f}" for k in ("frame", "pose", "depth", "visibility", "sample", "fuse",
                                                     "fill"))
              + f"; seen {row['seen']}, filled {row['filled']}"
              + (f"; held-out PSNR {row['heldout']['psnr']:.2f} dB SSIM {row['heldout']['ssim']:.4f}"
                 if eval_frames else ""))
    return rows


def compare_visibility(cfg, setup, seq, n_frames):
    sf = setup.surfels
    acfg = ag.aggregate_config(cfg)
    scales = np.asarray(sf.scales, np.float64)
    opac = np.full(sf.num_surfels, float(cfg.surfels.init_opacity))
    ids = np.unique(np.linspace(0, len(seq) - 1, n_frames).round().astype(int))
    t_mesh, t_surf, dd, jac, n_mesh, n_surf = [], [], [], [], [], []
    for i in ids:
        fr = seq[int(i)]
        B = frame_bone_transforms(setup.smpl, setup.rest_joints, setup.canonical_G, fr.poses, fr.world_from_body)
        means, normals = ag.pose_surfels(B, sf.skin_weights, sf.centers, sf.rotations)
        a = time.perf_counter()
        dm = ag.mesh_depth_map(lbs_points(sf.verts, sf.mesh_skin_weights, B), sf.faces, fr.camera)
        b = time.perf_counter()
        from fmgs.trainer.models.fields import blend_lbs

        with torch.no_grad():
            f32 = torch.float32
            lb = blend_lbs(torch.as_tensor(np.asarray(sf.skin_weights), dtype=f32), torch.as_tensor(B, dtype=f32),
                           torch.as_tensor(np.asarray(sf.centers), dtype=f32),
                           torch.as_tensor(np.asarray(sf.rotations), dtype=f32))
        ds = ag.surfel_depth_map(lb.means, lb.rotations, scales, opac, fr.camera)
        c = time.perf_counter()
        t_mesh.append(b - a)
        t_surf.append(c - b)
        both = np.isfinite(dm) & np.isfinite(ds)
        dd.append(float(np.median(np.abs(dm[both] - ds[both]))))
        vm = set(ag.visible_surfels(means, normals, fr.mask, fr.camera, dm, acfg)[0].tolist())
        vs = set(ag.visible_surfels(means, normals, fr.mask, fr.camera, ds, acfg)[0].tolist())
        jac.append(len(vm & vs) / max(len(vm | vs), 1))
        n_mesh.append(len(vm))
        n_surf.append(len(vs))
    out = {"frames": len(ids), "depth_map_s_median": {"mesh": statistics.median(t_mesh),
                                                      "surfels": statistics.median(t_surf)},
           "depth_abs_diff_m_median": statistics.median(dd), "visible_jaccard_mean": statistics.fmean(jac),
           "visible_per_frame_mean": {"mesh": statistics.fmean(n_mesh), "surfels": statistics.fmean(n_surf)}}
    print(f"visibility over {len(ids)} frames: depth map {out['depth_map_s_median']['mesh']:.3f} s (mesh) vs "
          f"{out['depth_map_s_median']['surfels']:.3f} s (surfels) per frame; median |depth diff| "
          f"{1000 * out['depth_abs_diff_m_median']:.1f} mm; visible surfels {out['visible_per_frame_mean']['mesh']:.0f}"
          f" vs {out['visible_per_frame_mean']['surfels']:.0f} per frame, Jaccard {out['visible_jaccard_mean']:.3f}")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", default="1", help="comma-separated init.frame_step values (default 1)")
    ap.add_argument("--eval-frames", type=int, default=0, help="held-out frames to score each preview on (0: none)")
    ap.add_argument("--compare-frames", type=int, default=0, help="frames for mesh vs surfels visibility (0: skip)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (surfel rasteriser, evaluation)")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    ap.add_argument("overrides", nargs="*", help="run-config overrides key=value (e.g. data.image_size=256)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(None, args.overrides)
    t0 = time.perf_counter()
    seq = open_sequence(cfg, "train")
    setup = build_setup(cfg, seq)
    load_s = seq.load()
    print(f"setup {time.perf_counter() - t0 - load_s:.2f} s, decoding {len(seq)} frames {load_s:.2f} s "
          f"({setup.surfels.num_surfels} surfels, {cfg.data.image_size}^2)")
    res = {"image_size": int(cfg.data.image_size), "surfels": setup.surfels.num_surfels, "load_s": load_s,
           "threads": args.threads,
           "runs": stage_timings(cfg, setup, seq, [int(s) for s in args.steps.split(",")], args.eval_frames)}
    if args.compare_frames:
        res["visibility"] = compare_visibility(cfg, setup, seq, args.compare_frames)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main()
