"""How much a trained full-model avatar actually depends on the pose.

    python benchmarks/pose_dependence.py RUN_DIR [--frames 40] [--grad-steps 4] [--json OUT.json]
        [--set KEY=VALUE ...]

Loads a trained ``model.kind=full`` run (:func:`fmgs.trainer.engine.run.load_run`) and reports,
over ``--frames`` evenly spaced training frames (each with its learnt pose correction, as in
training, and without pose noise):

1. **encoder input**: per joint, the spread (std over the frames) of the rotation-matrix
   entries, against the training pose noise ``model.full.pose_noise_std``; and what the
   encoder's first layers read (``HierarchicalPoseEncoder.prepare``: raw entries or
   ``(R - I) / scale``): its mean norm (the constant part) vs its across-pose spread;
2. **pose code Z_p** (16-d): per dimension, std over the frames vs mean |Z_p|; and the
   spread caused by the pose noise alone (``--noise-draws`` noisy copies of each frame's
   rotations), i.e. the code's signal-to-noise ratio;
3. **geometry residual** (eq. 3-6): per surfel, the std over the frames of the normal
   displacement ``delta_d`` (mm, after the displacement bound), of the log-scale residual
   and of the rotation residual (deg), and its mean |delta_d|; aggregated by SMPL part label
   (the surfel's parent face), largest first, with the arms / legs joints vs the torso; and
   the colour (eq. 7) spread over the frames at a fixed canonical view direction;
4. **gradients**: ``--grad-steps`` training iterations (the loop's own loss groups,
   coordinated backward, pose noise on; a fresh Adam at the run's rates so the measured
   steps are real ones): |dL/dZ_p| split into the geometry and the appearance paths, and the
   gradient norm / parameter norm of the pose encoder's layers vs the other networks.

Everything runs on the CPU in float32 with ``torch.no_grad`` except step 4. Prints markdown
tables; ``--json`` also writes the numbers. Exit code 2 with a one-line message on bad input
(not a run folder, not a full-model run).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

#: Parts where pose-dependent deformation is expected (joints that bend: the SMPL part is the
#: segment skinned to that joint, e.g. ``left_knee`` = the left shin) vs the torso.
LIMB_PARTS = ("left_knee", "right_knee", "left_elbow", "right_elbow", "left_hip", "right_hip",
              "left_shoulder", "right_shoulder")
TORSO_PARTS = ("pelvis", "spine1", "spine2", "spine3")


def _frame_rotations(model, setup, seq, idx):
    """Corrected local rotations (F, 24, 3, 3) of training frames ``idx`` (as in training)."""
    from fmgs.trainer.models.full import pose_frame

    rots = []
    for i in idx:
        name = seq.names[int(i)]
        info = seq.smpl_params(name)           # poses only: no image is decoded
        rot, _ = pose_frame(info["poses"], int(i), model.pose_correction, setup.rest_joints,
                            setup.canonical_G, np.eye(4))
        rots.append(rot)
    return torch.stack(rots)


def input_stats(model, rots, noise_std) -> dict:
    """Encoder-input statistics over the frames (section 1)."""
    from fmgs.body_model import JOINT_NAMES

    R = rots.clone()
    R[:, 0] = torch.eye(3)
    entry_std = R.reshape(R.shape[0], 24, 9).std(0)                     # (24, 9)
    per_joint = entry_std.max(1).values
    enc = model.pose_encoder
    x = enc.prepare(R[:, 1:]).reshape(R.shape[0], -1)                   # what the layers read
    rows = [{"joint": JOINT_NAMES[j], "max_entry_std": float(per_joint[j]),
             "noise_ratio": float(noise_std / max(float(per_joint[j]), 1e-9)) if noise_std > 0 else 0.0}
            for j in range(1, 24)]
    return {
        "mode": enc.input_mode, "scale": float(enc.input_scale),
        "rms_entry_std": float(entry_std[1:].pow(2).mean().sqrt()),
        "noise_std": float(noise_std),
        "joints_below_noise": int(sum(r["max_entry_std"] < noise_std for r in rows)),
        "input_mean_norm": float(x.mean(0).norm()),
        "input_spread_norm": float(x.std(0).norm()),
        "per_joint": rows,
    }


@torch.no_grad()
def code_stats(model, rots, joints, noise_std, noise_p_draws: int, gen) -> tuple[dict, torch.Tensor]:
    """Z_p over the frames and its spread under the training pose noise (section 2)."""
    from fmgs.trainer.models.fields import add_pose_noise

    Z = model.pose_encoder(rots, joints)                                # (F, 16)
    std, mag = Z.std(0), Z.abs().mean(0)
    noise_spread = torch.zeros_like(std)
    if noise_std > 0 and noise_p_draws > 0:
        devs = []
        for _ in range(noise_p_draws):
            Zn = model.pose_encoder(add_pose_noise(rots, noise_std, 1.0, generator=gen), joints)
            devs.append(Zn - Z)
        noise_spread = torch.stack(devs).std(0).mean(0)
    return {
        "std_per_dim": std.tolist(), "mean_abs_per_dim": mag.tolist(),
        "std_mean": float(std.mean()), "mean_abs_mean": float(mag.mean()),
        "std_over_mean_abs": float(std.mean() / mag.mean().clamp_min(1e-12)),
        "code_norm": float(Z.norm(dim=1).mean()),
        "noise_spread_mean": float(noise_spread.mean()),
        "pose_to_noise": float(std.mean() / noise_spread.mean().clamp_min(1e-12)) if noise_std > 0 else float("inf"),
    }, Z


@torch.no_grad()
def residual_stats(model, Z, labels) -> dict:
    """Per-surfel spread of the geometry residual and the colour over the frames (section 3)."""
    from fmgs.body_model import JOINT_NAMES

    f_g, f_c = model.canonical_features(semantic=False)[:2]
    n = f_g.shape[0]
    # Welford over the frames: mean / M2 per surfel
    keys = ("delta_d", "delta_s", "delta_r", "color")
    mean = {k: None for k in keys}
    m2 = {k: None for k in keys}
    view = torch.tensor([[0.0, 0.0, 1.0]]).expand(n, 3)     # fixed canonical view direction (front)
    for t in range(Z.shape[0]):
        z = Z[t:t + 1]
        res = model.geometry_residual(f_g, z)
        col = model.appearance_field(f_c, res.z_g, z, view)
        vals = {"delta_d": res.delta_d[:, 0], "delta_s": res.delta_s, "delta_r": res.delta_r.norm(dim=1),
                "color": col}
        for k, v in vals.items():
            if mean[k] is None:
                mean[k], m2[k] = v.clone(), torch.zeros_like(v)
            else:
                d = v - mean[k]
                mean[k] += d / (t + 1)
                m2[k] += d * (v - mean[k])
    T = Z.shape[0]
    sd = {k: (m2[k] / max(T - 1, 1)).sqrt() for k in keys}
    dd_std = sd["delta_d"] * 1000.0                                     # mm
    ds_std = sd["delta_s"].norm(dim=1)
    dr_std = torch.rad2deg(sd["delta_r"])
    col_std = sd["color"].norm(dim=1)
    dd_abs = mean["delta_d"].abs() * 1000.0
    parts = []
    lab = torch.as_tensor(labels)
    for j in range(24):
        m = lab == j
        if int(m.sum()) == 0:
            continue
        parts.append({"part": JOINT_NAMES[j], "surfels": int(m.sum()),
                      "dd_std_mm": float(dd_std[m].mean()), "dd_std_p95_mm": float(dd_std[m].quantile(0.95)),
                      "dd_abs_mm": float(dd_abs[m].mean()), "ds_std": float(ds_std[m].mean()),
                      "dr_std_deg": float(dr_std[m].mean()), "color_std": float(col_std[m].mean())})
    parts.sort(key=lambda r: -r["dd_std_mm"])

    def group(names):
        m = torch.zeros(n, dtype=torch.bool)
        for nm in names:
            m |= lab == JOINT_NAMES.index(nm)
        return {"dd_std_mm": float(dd_std[m].mean()), "color_std": float(col_std[m].mean()),
                "dr_std_deg": float(dr_std[m].mean())}

    limbs, torso = group(LIMB_PARTS), group(TORSO_PARTS)
    md = float(model.cfg.max_displacement)
    sat = float((mean["delta_d"].abs() > 0.95 * md).float().mean()) if md > 0 else 0.0
    return {"dd_std_mm_mean": float(dd_std.mean()),
            "dd_signed_mm_mean": float(mean["delta_d"].mean() * 1000.0), "bound_mm": md * 1000.0,
            "saturated_fraction": sat, "dd_std_mm_p95": float(dd_std.quantile(0.95)),
            "dd_std_mm_max": float(dd_std.max()), "dd_abs_mm_mean": float(dd_abs.mean()),
            "ds_std_mean": float(ds_std.mean()), "dr_std_deg_mean": float(dr_std.mean()),
            "color_std_mean": float(col_std.mean()),
            "limbs": limbs, "torso": torso,
            "limb_to_torso_dd": limbs["dd_std_mm"] / max(torso["dd_std_mm"], 1e-12),
            "per_part": parts}


def gradient_stats(run, steps: int) -> dict:
    """Gradient reaching the pose encoder over ``steps`` real training iterations (section 4)."""
    from fmgs.priors import load_priors
    from fmgs.trainer.engine.run import make_optimizer
    from fmgs.trainer.engine.train import semantic_iteration

    cfg, model, setup, seq = run.cfg, run.model, run.setup, run.seq
    model.train()
    opt = make_optimizer(cfg, model)
    store: dict[str, torch.Tensor] = {}

    def tap(module, name):
        orig = module.forward

        def fwd(*args):
            args = list(args)
            z = args[1] if name == "geometry" else args[2]
            z = z.clone()
            z.retain_grad()
            store[name] = z
            if name == "geometry":
                args[1] = z
            else:
                args[2] = z
            return orig(*args)
        module.forward = fwd
        return orig

    orig_g = tap(model.geometry_field, "geometry") if model.geometry_field is not None else None
    orig_a = tap(model.appearance_field, "appearance")
    enc = model.pose_encoder
    modules = {"encoder.global_layer": enc.global_layer, "encoder.joint_mlps": enc.joint_mlps,
               "encoder.out_layer": enc.out_layer, "geometry_field": model.geometry_field,
               "appearance_field": model.appearance_field, "geometry_grid": model.geometry_grid}
    rows = []
    rng = np.random.default_rng(12345)
    for s in range(steps):
        idx = int(rng.integers(len(seq)))
        fr = seq[idx]
        prior = load_priors(cfg.data.root, [seq.names[idx]], int(cfg.data.image_size), cfg.data.priors_dir)[0]
        opt.zero_grad(set_to_none=True)
        it = int(run.iteration) + s
        gen = torch.Generator().manual_seed(777 + s)
        posed = model.pose(fr, setup, frame_id=idx, training=True, semantic=semantic_iteration(cfg, it))
        out = model.render(posed, fr.camera, cfg)
        groups = model.loss_groups(cfg, out, posed, fr, prior, it, generator=gen)
        model.backward(posed, groups, cfg)
        row = {"frame": idx,
               "dZ_geometry": float(store["geometry"].grad.norm()) if "geometry" in store and store["geometry"].grad is not None else 0.0,
               "dZ_appearance": float(store["appearance"].grad.norm()) if store["appearance"].grad is not None else 0.0}
        for name, m in modules.items():
            if m is None:
                continue
            ps = [p for p in m.parameters() if p.requires_grad]
            g = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in ps if p.grad is not None))
            w = math.sqrt(sum(float(p.detach().pow(2).sum()) for p in ps))
            row[f"{name}.grad"] = g
            row[f"{name}.grad_over_param"] = g / max(w, 1e-12)
        opt.step()
        rows.append(row)
    if orig_g is not None:
        model.geometry_field.forward = orig_g
    model.appearance_field.forward = orig_a
    model.eval()
    keys = [k for k in rows[0] if k != "frame"]
    return {"steps": rows, "median": {k: float(np.median([r[k] for r in rows])) for k in keys}}


def _fmt(x, nd=4):
    return f"{x:.{nd}g}" if isinstance(x, float) else str(x)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--frames", type=int, default=40, help="evenly spaced training frames (>= 2)")
    ap.add_argument("--noise-draws", type=int, default=8, help="noisy copies per frame for the code's noise spread")
    ap.add_argument("--grad-steps", type=int, default=4, help="training iterations for the gradient norms (0 = skip)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))

    from fmgs.errors import FmgsInputError
    from fmgs.trainer.engine.run import load_run
    from fmgs.trainer.models.fields import normalize_canonical_joints
    from fmgs.trainer.models.full import canonical_pose_joints

    try:
        if args.frames < 2:
            raise FmgsInputError(f"--frames must be >= 2, got {args.frames}")
        run = load_run(args.run_dir, tuple(args.overrides), split="train")
        if run.kind != "full":
            raise FmgsInputError(f"not a full-model run (model.kind={run.kind})", args.run_dir)
    except FmgsInputError as exc:
        print(f"pose_dependence: {exc}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    model, setup, seq, cfg = run.model, run.setup, run.seq, run.cfg
    idx = np.unique(np.linspace(0, len(seq) - 1, args.frames).round().astype(int))
    noise_std = float(cfg.model.full.pose_noise_std) if float(cfg.model.full.pose_noise_p) > 0 else 0.0
    with torch.no_grad():
        rots = _frame_rotations(model, setup, seq, idx)
    joints = normalize_canonical_joints(torch.as_tensor(canonical_pose_joints(setup.surfels), dtype=torch.float32))
    gen = torch.Generator().manual_seed(0)
    report = {"run": str(args.run_dir), "iteration": run.iteration, "frames": len(idx)}
    report["input"] = input_stats(model, rots, noise_std)
    report["code"], Z = code_stats(model, rots, joints, noise_std, args.noise_draws, gen)
    if model.geometry_field is not None:
        report["residual"] = residual_stats(model, Z, np.asarray(model.current_surfels.part_labels))
    if args.grad_steps > 0:
        report["gradients"] = gradient_stats(run, args.grad_steps)
    report["seconds"] = time.perf_counter() - t0

    i, c = report["input"], report["code"]
    print(f"# pose dependence of {args.run_dir} (iteration {run.iteration}, {len(idx)} training frames)\n")
    print(f"encoder input: mode {i['mode']} (scale {i['scale']:g}); rotation entries vary by "
          f"{i['rms_entry_std']:.3f} RMS over the poses; pose noise std {i['noise_std']:g} exceeds the "
          f"largest entry spread of {i['joints_below_noise']} of 23 joints; what the layers read: "
          f"constant part {i['input_mean_norm']:.2f} vs spread {i['input_spread_norm']:.2f} (norms)")
    print(f"pose code Z_p: std over poses {c['std_mean']:.4f} per dim vs mean |Z_p| {c['mean_abs_mean']:.4f} "
          f"(ratio {c['std_over_mean_abs']:.3f}; |Z_p| {c['code_norm']:.3f}); spread from the pose noise "
          f"{c['noise_spread_mean']:.4f} -> pose/noise {c['pose_to_noise']:.2f}")
    if "residual" in report:
        r = report["residual"]
        print(f"geometry residual over poses: std(delta_d) mean {r['dd_std_mm_mean']:.4f} mm, p95 "
              f"{r['dd_std_mm_p95']:.4f} mm, max {r['dd_std_mm_max']:.3f} mm (mean |delta_d| "
              f"{r['dd_abs_mm_mean']:.3f} mm, signed {r['dd_signed_mm_mean']:+.3f} mm; bound {r['bound_mm']:g} mm, "
              f"{100 * r['saturated_fraction']:.1f} % of the surfels beyond 95 % of it); rotation {r['dr_std_deg_mean']:.4f} deg; colour "
              f"{r['color_std_mean']:.5f}; limbs / torso std(delta_d) = {r['limbs']['dd_std_mm']:.4f} / "
              f"{r['torso']['dd_std_mm']:.4f} mm ({r['limb_to_torso_dd']:.2f}x)\n")
        print("| part | surfels | std delta_d (mm) | p95 (mm) | mean abs delta_d (mm) | std delta_r (deg) | std colour |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for p in r["per_part"]:
            print(f"| {p['part']} | {p['surfels']} | {p['dd_std_mm']:.4f} | {p['dd_std_p95_mm']:.4f} | "
                  f"{p['dd_abs_mm']:.3f} | {p['dr_std_deg']:.4f} | {p['color_std']:.5f} |")
    if "gradients" in report:
        med = report["gradients"]["median"]
        print(f"\ngradients over {args.grad_steps} training iterations (median):\n")
        print("| quantity | value |\n| --- | --- |")
        for k, v in med.items():
            print(f"| {k} | {_fmt(v)} |")
    print(f"\n({report['seconds']:.1f} s)")
    if args.json:
        from fmgs.atomic import write_json_atomic

        write_json_atomic(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
