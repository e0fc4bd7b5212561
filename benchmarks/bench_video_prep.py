"""Score ``fmgs-prep video`` outputs against a dataset's own masks and SMPL fits.

ZJU-MoCap 377 used as a raw video (its images only):

    fmgs-prep video ../shared/data/zju_mocap/377/images --out runs/prep377 \\
        --camera ../shared/data/zju_mocap/377/cameras.pkl
    python benchmarks/bench_video_prep.py zju runs/prep377 ../shared/data/zju_mocap/377

prints mask IoU (mean, p5) of the prepared masks vs the dataset's (both undistorted when the
prep undistorted), and MPJPE / PA-MPJPE (mm) of the fitted SMPL joints vs the dataset's, both
in the camera frame, pelvis-aligned (MPJPE) or similarity-aligned (PA-MPJPE, Umeyama).

PeopleSnapshot (joint rotations vs the Anim-NeRF refined poses, gendered SMPL so positions are
not comparable):

    python benchmarks/bench_video_prep.py snapshot runs/prepm3c ../shared/data/people_snapshot/male-3-casual

prints the mean geodesic angle (degrees) between fitted and Anim-NeRF local rotations of the
23 body joints (hands excluded: 22 joints) and of the global orientation, over the frames of
the standard train/val/test split that the prep wrote.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from fmgs.body_model import axis_angle_to_matrix
from fmgs.pickle_io import load_pickle


def umeyama(src, dst):
    """Similarity (s, R, t) minimising |s R src + t - dst| (Umeyama 1991)."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    a, b = src - mu_s, dst - mu_d
    U, S, Vt = np.linalg.svd(b.T @ a / len(src))
    D = np.eye(3)
    D[2, 2] = np.sign(np.linalg.det(U @ Vt))
    R = U @ D @ Vt
    s = np.trace(np.diag(S) @ D) / (a ** 2).sum(1).mean()
    return s, R, mu_d - s * R @ mu_s


def zju(prep: Path, ds: Path) -> dict:
    from fmgs.trainer.data.humannerf import read_mask, undistort_image

    rep = json.loads((prep / "fit_report.json").read_text())
    undist = rep["camera"]["undistorted"]
    cams_d = load_pickle(ds / "cameras.pkl")
    info_d = load_pickle(ds / "mesh_infos.pkl")
    info_p = load_pickle(prep / "mesh_infos.pkl")
    ious, mpjpe, pa = [], [], []
    for name in sorted(info_p):
        c = cams_d[name]
        gt = read_mask(ds / "masks" / f"{name}.png")
        if undist:
            gt = undistort_image(gt, c["intrinsics"], c["distortions"], nearest=True)
        pm = read_mask(prep / "masks" / f"{name}.png")
        ious.append((gt & pm).sum() / max(1, (gt | pm).sum()))
        d = info_d[name]
        E = np.asarray(c["extrinsics"], float)
        jw = d["joints"] @ axis_angle_to_matrix(d["Rh"]).T + d["Th"]
        jd = jw @ E[:3, :3].T + E[:3, 3]
        p = info_p[name]
        jp = p["joints"] @ axis_angle_to_matrix(p["Rh"]).T + p["Th"]
        mpjpe.append(np.linalg.norm((jp - jp[0]) - (jd - jd[0]), axis=1).mean())
        s, R, t = umeyama(jp, jd)
        pa.append(np.linalg.norm(jp @ (s * R).T + t - jd, axis=1).mean())
    ious = np.array(ious)
    return dict(frames=len(ious), mask_iou_mean=float(ious.mean()),
                mask_iou_p5=float(np.percentile(ious, 5)),
                mpjpe_mm=1e3 * float(np.mean(mpjpe)), pa_mpjpe_mm=1e3 * float(np.mean(pa)),
                fit_reproj_px=rep["summary"]["reproj_px_mean"],
                fit_silhouette_iou=rep["summary"]["silhouette_iou_mean"],
                seconds_per_frame=rep["timings"]["seconds_per_frame"])


def _geodesic_deg(Ra, Rb):
    c = (np.trace(np.swapaxes(Ra, -1, -2) @ Rb, axis1=-2, axis2=-1) - 1) / 2
    return np.degrees(np.arccos(np.clip(c, -1, 1)))


def snapshot(prep: Path, ds: Path) -> dict:
    info_p = load_pickle(prep / "mesh_infos.pkl")
    rep = json.loads((prep / "fit_report.json").read_text())
    steps = {"male-3-casual": {"train": (0, 455, 4), "val": None, "test": (456, 675, 4)},
             "female-3-casual": {"train": (0, 445, 4), "val": None, "test": (446, 647, 4)}}[ds.name]
    body, glob, n = [], [], 0
    for split in ("train", "test"):
        z = np.load(ds / "poses" / f"anim_nerf_{split}.npz")
        a, b, s = steps[split]
        frames = list(range(a, b, s))[: len(z["body_pose"])]
        for k, fi in enumerate(frames):
            name = f"frame_{fi:06d}"
            if name not in info_p:
                continue
            p = info_p[name]
            Rp = axis_angle_to_matrix(p["poses"].reshape(24, 3)[1:22])
            Ra = axis_angle_to_matrix(z["body_pose"][k].reshape(23, 3)[:21])
            body.append(_geodesic_deg(Rp, Ra).mean())
            # global orientation: ours is Rh (camera frame = world); Anim-NeRF's too (camera_rt = 0)
            glob.append(float(_geodesic_deg(axis_angle_to_matrix(p["Rh"]),
                                            axis_angle_to_matrix(z["global_orient"][k]))))
            n += 1
    return dict(frames=n, body_joint_rot_err_deg=float(np.mean(body)),
                global_orient_err_deg=float(np.mean(glob)),
                seconds_per_frame=rep["timings"]["seconds_per_frame"],
                fit_reproj_px=rep["summary"]["reproj_px_mean"],
                fit_silhouette_iou=rep["summary"]["silhouette_iou_mean"])


if __name__ == "__main__":
    kind, prep, ds = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    print(json.dumps((zju if kind == "zju" else snapshot)(prep, ds), indent=2))
