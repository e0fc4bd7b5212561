"""Skeleton motion -> SMPL: CMU 01_01 as BVH vs ASF/AMC, bone-direction fidelity, AMASS round trip.

1. **BVH vs ASF/AMC.** ``load_motion`` of ``cmu_fairmotion/01_01.bvh`` and ``01_01.amc``
   (+ ``01.asf``), both retargeted to the neutral SMPL: per-joint rotation difference
   (degrees, ``|log(R_bvh^-1 R_amc)|``) over all frames, mean / max, and the root translation
   difference. The BVH has one extra leading frame (the converter's rest frame), so BVH
   frame ``k + 1`` is compared with AMC frame ``k``.
2. **Fidelity.** The source skeleton posed by the ``bvhio`` library's own hierarchy FK
   (``readAsHierarchy`` + ``loadPose`` + ``PositionWorld``) for every ``--step``-th frame;
   the retargeted SMPL posed by SMPL FK; per SMPL bone whose both ends are mapped, the angle
   between the two world directions; mean and p95 per limb.
3. **Round trip.** An AMASS clip written as a BVH of the SMPL skeleton
   (``fmgs.skeleton.write_smpl_bvh``, Y-up, metres) and read back by ``load_motion``:
   SMPL joint positions (player world), max / mean error in millimetres.

Usage:
    python benchmarks/bench_retarget.py --step 1 --json runs/bench_retarget.json
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from scipy.spatial.transform import Rotation
from tqdm import tqdm

from fmgs.body_model import load_smpl
from fmgs.motion import load_motion
from fmgs.paths import data_root, smpl_neutral_path
from fmgs.skeleton import (
    SMPL_JOINT_NAMES, bone_direction_errors, read_bvh, rest_positions, retarget_to_smpl, smpl_fk_positions,
    write_smpl_bvh,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--step", type=int, default=1, help="fidelity: every n-th frame")
    ap.add_argument("--amass", default="amass_samples/human_body_prior__amass_sample.npz")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    root = data_root() / "motion"
    cmu = root / "cmu_fairmotion"
    rest = load_smpl(smpl_neutral_path()).shape()[1]
    out: dict = {}

    # 1. BVH vs ASF/AMC
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        mb = load_motion(cmu / "01_01.bvh", rest_joints=rest)
        t1 = time.perf_counter()
        ma = load_motion(cmu / "01_01.amc", rest_joints=rest)
        t2 = time.perf_counter()
    pb, pa = mb.poses[1:], ma.poses
    d = np.degrees((Rotation.from_rotvec(pb.reshape(-1, 3)).inv() * Rotation.from_rotvec(pa.reshape(-1, 3)))
                   .magnitude()).reshape(pa.shape[:2])
    out["bvh_vs_amc"] = {
        "frames": [mb.num_frames, ma.num_frames], "fps": [mb.fps, ma.fps],
        "rot_diff_deg_mean": float(d.mean()), "rot_diff_deg_max": float(d.max()),
        "per_joint_mean_deg": {SMPL_JOINT_NAMES[k]: float(d[:, k].mean()) for k in range(24)},
        "trans_diff_m_max": float(np.abs(mb.trans[1:] - ma.trans).max()),
        "load_s": {"bvh": t1 - t0, "amc": t2 - t1},
    }
    print(f"BVH vs ASF/AMC: {ma.num_frames} frames, rotation difference mean {d.mean():.2e} deg, "
          f"max {d.max():.2e} deg; translation max {out['bvh_vs_amc']['trans_diff_m_max']:.2e} m; "
          f"load {t1 - t0:.2f} s (BVH) / {t2 - t1:.2f} s (AMC)")
    for line in mb.notes:
        print("  " + line)

    # 2. fidelity against bvhio's FK
    import bvhio

    src = cmu / "01_01.bvh"
    sk = read_bvh(src)
    rt = retarget_to_smpl(sk, rest)
    t0 = time.perf_counter()
    h = bvhio.readAsHierarchy(str(src))
    joints = [j for j, _, _ in h.layout()]
    names = [j.Name for j in joints]
    frames = np.arange(0, sk.num_frames, args.step)
    P = np.zeros((len(frames), len(joints), 3))
    for a, f in enumerate(tqdm(frames, desc="bvhio FK", leave=False)):
        h.loadPose(int(f))
        for k, j in enumerate(joints):
            v = j.PositionWorld
            P[a, k] = (v.x, v.y, v.z)
    A = rt.axes_from_source
    idx = {SMPL_JOINT_NAMES.index(k): names.index(v) for k, v in rt.joint_map.items()}
    src_rest = rest_positions(sk)[[sk.names.index(n) for n in names]] @ A.T
    err = bone_direction_errors(smpl_fk_positions(rt.poses[frames], rt.trans[frames], rest), P @ A.T, idx, src_rest)
    out["fidelity"] = {"frames": len(frames), "bvhio_fk_s": time.perf_counter() - t0, "per_limb": {}}
    print(f"bone-direction fidelity vs bvhio FK, {len(frames)} frames:")
    for limb, e in err.items():
        r = {"bones": int(e.shape[1]), "mean_deg": float(e.mean()), "p95_deg": float(np.percentile(e, 95)),
             "max_deg": float(e.max())}
        out["fidelity"]["per_limb"][limb] = r
        print(f"  {limb:15s} {r['bones']} bones: mean {r['mean_deg']:.4f} deg, p95 {r['p95_deg']:.4f} deg, "
              f"max {r['max_deg']:.4f} deg")
    allb = np.concatenate([e.reshape(-1) for e in err.values()])
    out["fidelity"]["all"] = {"mean_deg": float(allb.mean()), "p95_deg": float(np.percentile(allb, 95))}
    print(f"  all bones: mean {allb.mean():.3f} deg, p95 {np.percentile(allb, 95):.3f} deg")

    # 3. AMASS round trip
    m = load_motion(root / args.amass)
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "smpl.bvh"
        write_smpl_bvh(p, m.poses, m.trans, rest, m.fps, world_rotation=m.world_from_motion)
        size = p.stat().st_size
        back = load_motion(p, rest_joints=rest)
    W = m.world_from_motion[:3, :3]
    ref = smpl_fk_positions(m.poses, m.trans, rest) @ W.T
    got = smpl_fk_positions(back.poses, back.trans, rest) @ back.world_from_motion[:3, :3].T
    e = np.linalg.norm(ref - got, axis=-1) * 1e3
    out["round_trip"] = {"clip": args.amass, "frames": m.num_frames, "bvh_bytes": size,
                         "joint_err_mm_max": float(e.max()), "joint_err_mm_mean": float(e.mean())}
    print(f"AMASS round trip ({args.amass}, {m.num_frames} frames, BVH {size / 1e6:.1f} MB): joint position error "
          f"max {e.max():.2e} mm, mean {e.mean():.2e} mm")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
