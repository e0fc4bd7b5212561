"""Test-time pose refinement: fit a held-out frame's SMPL pose to its image with the avatar frozen.

Monocular avatars are scored at poses that come from the same noisy per-frame fit as their
training poses. When the held-out poses come from a monocular fit (``fmgs-prep video``, or
any video without multi-view capture), part of the error a metric sees is the fit's
misalignment, not the avatar. The field's protocol for such data (Anim-NeRF, InstantAvatar,
3DGS-Avatar, GART on PeopleSnapshot) optimises each test frame's SMPL pose against its image
with the trained avatar frozen before scoring. ``fmgs-eval --refine-poses N`` does that:

    minimise over (d_theta (72,), d_T (3,)):
        photometric(render(theta + d_theta, T + d_T), image)          (eq. 13 of the paper)
        + lambda_mask * BCE(alpha, mask)                               (eq. 14)
        + reg * (|d_theta|^2 + |d_T / 0.1 m|^2)

with Adam for N iterations from the frame's own pose (``d = 0``), at the evaluation
resolution. ``d_theta`` covers all 24 joints (joint 0 rotates the body about the pelvis),
``d_T`` translates the body in world space. Only the pose moves: the avatar's parameters
are frozen, so the avatar is the same one that is scored without refinement. Numbers with
and without refinement are different protocols and are reported as such (``metrics.json``
records ``pose_refinement``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["REFINED_REPORT", "RefineSettings", "refine_frame_pose", "refine_training_poses"]


@dataclass(frozen=True)
class RefineSettings:
    """Test-time pose refinement settings. The learning rates and the suggested 40 steps were
    chosen on the validation split of ZJU-MoCap 377 prepared by ``fmgs-prep video``
    (docs/benchmarks.md: 28.96 dB without, 30.58 with 20 steps, 30.94 with 40).

    Attributes:
        iterations: Adam steps per frame (0 = off).
        lr_pose: learning rate of ``d_theta`` (radians).
        lr_translation: learning rate of ``d_T`` (metres).
        reg: weight of the pull of ``d_theta`` and ``d_T / 0.1 m`` towards zero.
        photometric: weight of the photometric term (1 = the test-time protocol; 0 = fit the
            avatar's silhouette to the frame's mask only, the information a per-frame SMPL
            fit already uses; :func:`refine_training_poses`' ``held_out`` frames use it).
    """

    iterations: int = 0
    lr_pose: float = 1e-2
    lr_translation: float = 3e-3
    reg: float = 1e-3
    photometric: float = 1.0


def refine_frame_pose(model, setup, frame, cfg, settings: RefineSettings):
    """Refine one held-out frame's pose against its image (module docstring).

    Args:
        model: a trained :class:`~fmgs.trainer.models.base.AvatarModel` (any kind with
            :meth:`~fmgs.trainer.models.base.AvatarModel.pose_at`); its parameters are not
            changed.
        setup: the subject.
        frame: the held-out :class:`~fmgs.trainer.data.humannerf.Frame` (``image``,
            ``mask``, ``poses (72,)``, ``world_from_body (4, 4)``, ``camera``).
        cfg: the run config (loss weights ``train.lambda_ssim``, ``train.lambda_mask``,
            background, back-end).
        settings: :class:`RefineSettings`.

    Returns:
        ``(frame', stats)``: a copy of ``frame`` whose ``poses``, ``Rh``, ``Th`` and
        ``world_from_body`` are the refined ones (float32 / float64 as the reader's), and
        ``{"loss_first", "loss_last", "rotation_deg", "translation_mm"}`` (largest joint
        rotation change in degrees, translation change in millimetres).
    """
    from fmgs.trainer.losses.terms import mask_bce_loss, photometric_loss

    n = int(settings.iterations)
    if n <= 0:
        return frame, {}
    dev = next(model.parameters()).device
    theta0 = torch.as_tensor(np.asarray(frame.poses, np.float64), dtype=torch.float32, device=dev).reshape(72)
    W0 = torch.as_tensor(np.asarray(frame.world_from_body, np.float64), dtype=torch.float32, device=dev)
    d_theta = torch.zeros(72, device=dev, requires_grad=True)
    d_T = torch.zeros(3, device=dev, requires_grad=True)
    opt = torch.optim.Adam([{"params": [d_theta], "lr": float(settings.lr_pose)},
                            {"params": [d_T], "lr": float(settings.lr_translation)}])
    gt = torch.from_numpy(np.ascontiguousarray(frame.image)).to(dev)
    mask = torch.from_numpy(np.ascontiguousarray(frame.mask)).to(dev)
    lam_ssim, lam_mask = float(cfg.train.lambda_ssim), float(cfg.train.lambda_mask)
    w_photo = float(settings.photometric)
    losses = []
    with model.frozen():     # the avatar's parameters frozen, its pose-independent parts computed once
        for _ in range(n):
            opt.zero_grad()
            W = W0.clone()
            W[:3, 3] = W0[:3, 3] + d_T
            out = model.render(model.pose_at(frame, setup, theta0 + d_theta, W), frame.camera, cfg)
            loss = lam_mask * mask_bce_loss(out.alpha, mask)
            if w_photo > 0:
                loss = loss + w_photo * photometric_loss(out.rgb, gt, lambda_ssim=lam_ssim)
            losses.append(float(loss.detach()))
            loss = loss + float(settings.reg) * ((d_theta ** 2).sum() + ((d_T / 0.1) ** 2).sum())
            loss.backward()
            opt.step()
    with torch.no_grad():
        poses = (theta0 + d_theta).cpu().numpy().astype(np.float32)
        T = (W0[:3, 3] + d_T).double().cpu().numpy()
    world_from_body = np.asarray(frame.world_from_body, np.float64).copy()
    world_from_body[:3, 3] = T
    # A refined joint-0 rotation stays in ``poses[:3]`` (it turns the body about the pelvis
    # joint, not about the body origin that ``Rh`` turns it about), so ``Rh`` is unchanged.
    refined = dataclasses.replace(frame, poses=poses, Th=T.astype(np.float32), world_from_body=world_from_body)
    dR = np.abs(poses.astype(np.float64) - np.asarray(frame.poses, np.float64)).reshape(24, 3)
    rot_deg = float(np.degrees(np.linalg.norm(dR, axis=1).max()))
    return refined, {"loss_first": losses[0], "loss_last": losses[-1], "rotation_deg": rot_deg,
                     "translation_mm": float(1e3 * np.linalg.norm(d_T.detach().cpu().numpy()))}


# =========================================================================== training poses
#: File that marks a sequence written by :func:`refine_training_poses` (its report).
REFINED_REPORT = "pose_refinement.json"


def _link_or_copy(src, dst) -> None:
    """Hard-link ``src`` to ``dst`` (no extra disk), else copy it."""
    import os
    import shutil

    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _refined_is_ours(path):
    from pathlib import Path

    return None if (Path(path) / REFINED_REPORT).is_file() else f"no {REFINED_REPORT} in it"


def refine_training_poses(run_dir, out, every: int = 4, settings: RefineSettings | None = None,
                          overwrite: bool = False, overrides=(), progress: bool = True,
                          held_out: int = 0) -> dict:
    """Write a copy of a run's sequence whose *training* poses are refined against their
    images with the run's avatar frozen (one bootstrap round of the pose/avatar alternation).

    Monocular fits (``fmgs-prep video``) are off by a slowly varying few pixels
    (docs/benchmarks.md, "Where the 2.2 dB go"): an avatar trained on them is blurred by
    the misalignment. The alternation that 3DGS-Avatar / InstantAvatar / GART run inside
    training (SMPL parameters optimised with the avatar) is done here offline, once: every
    ``every``-th training frame (and the last) is refined with :func:`refine_frame_pose`;
    the pose change of the frames in between is interpolated linearly in time (the
    additive axis-angle and translation changes of the two nearest refined frames: the fit
    error varies slowly, so the knots carry it). Validation and test frames keep their
    poses, so the held-out protocol is unchanged, unless ``held_out`` is set: then every
    validation and test frame of the run's config (``data.val_step``, ``data.test_step``) is
    fitted on its own for ``held_out`` steps to its **mask only** (``photometric = 0``: no
    colour of a frame that is scored enters its pose) with the same avatar, the pipeline's
    second fitting pass for frames that are not trained on (docs/benchmarks.md, "Tenth
    round"). Train a new run on ``out``.

    ``out`` holds hard links to (or copies of) the source's ``images/`` and ``masks/``,
    its ``cameras.pkl`` and ``canonical_joints.pkl``, a ``mesh_infos.pkl`` with the refined
    ``poses``/``Th`` (``joints`` recomputed by forward kinematics of ``tpose_joints``) and
    ``pose_refinement.json`` (run, settings, per-refined-frame statistics). Priors are not
    carried (those rendered from the body model depend on the poses: run ``fmgs-prep
    priors`` on ``out``). Written in a staging folder and moved into place at the end.

    Args:
        run_dir: a trained run (``fmgs-train``); its ``data.root`` is the source sequence.
        out: the new sequence folder (must not exist, or be one this function wrote and
            ``overwrite``).
        every: refine every ``every``-th training frame (>= 1; 1 = all).
        settings: :class:`RefineSettings` (default 40 steps, the validation-chosen rates);
            ``iterations = 0`` leaves the training poses as they are (with ``held_out``).
        overwrite: replace an ``out`` written by this function.
        overrides: ``key=value`` over the run's config (e.g. ``train.device=cpu``).
        progress: show a progress bar.
        held_out: mask-only steps for each validation and test frame (0 = leave them);
            the learning rates and ``reg`` are ``settings``'.

    Returns:
        The report written to ``pose_refinement.json``.

    Raises:
        FmgsInputError: not a run folder / data missing (names the file), ``every < 1``,
            no step to take (zero training and held-out steps), ``out`` exists and is not
            ours or ``overwrite`` is off, or ``out`` is or holds the source sequence or the run.
    """
    import os
    import pickle
    import shutil
    import tempfile
    import time
    from pathlib import Path

    from tqdm import tqdm

    from fmgs.atomic import check_replaceable, clean_stale, default_mode, publish_folder, staging_prefix
    from fmgs.body_model import axis_angle_to_matrix, forward_kinematics
    from fmgs.errors import FmgsInputError
    from fmgs.trainer.engine.run import load_run

    settings = settings or RefineSettings(iterations=40)
    if isinstance(every, bool) or int(every) < 1:
        raise FmgsInputError(f"--every must be a positive number of frames, got {every!r}")
    if isinstance(held_out, bool) or int(held_out) < 0:
        raise FmgsInputError(f"--held-out-steps must be 0 or more, got {held_out!r}")
    if int(settings.iterations) < 0 or (int(settings.iterations) == 0 and int(held_out) == 0):
        raise FmgsInputError(f"--steps must be at least 1 (or 0 with --held-out-steps), got "
                             f"{settings.iterations!r}")
    run_dir, out = Path(run_dir), Path(out)
    run = load_run(run_dir, overrides, split="train")
    seq, src = run.seq, Path(run.seq.root)
    protect = (src, run_dir)
    if os.path.lexists(out):
        if not overwrite:
            raise FmgsInputError("already exists; pass --overwrite to replace a refined sequence "
                                 "written by fmgs-prep refine, or choose another --out", out)
        check_replaceable(out, _refined_is_ours, protect=protect, what="refined sequence folder")
    for p in protect:
        if out.resolve() == p.resolve() or p.resolve() in out.resolve().parents:
            raise FmgsInputError(f"--out lies inside {p}, which the command reads (choose another --out)", out)

    n = len(seq)
    knots = list(range(0, n, int(every))) if int(settings.iterations) > 0 else []
    if knots and knots[-1] != n - 1:
        knots.append(n - 1)
    held = []
    if int(held_out) > 0:
        from fmgs.trainer.engine.run import open_sequence

        splits = (["val"] if float(run.cfg.data.val_fraction) > 0 else []) + ["test"]
        held = [open_sequence(run.cfg, sp) for sp in splits]
    held_settings = dataclasses.replace(settings, iterations=int(held_out), photometric=0.0)
    t0 = time.perf_counter()
    d_pose = np.zeros((len(knots), 72))
    d_T = np.zeros((len(knots), 3))
    stats, held_stats, held_poses = [], [], {}
    with run.model.frozen():     # pose-independent parts computed once for all the frames
        for j, i in enumerate(tqdm(knots, desc="refine training poses", unit="frame", disable=not progress)):
            fr = seq[i]
            ref, st = refine_frame_pose(run.model, run.setup, fr, run.cfg, settings)
            d_pose[j] = np.asarray(ref.poses, np.float64) - np.asarray(fr.poses, np.float64)
            d_T[j] = np.asarray(ref.Th, np.float64) - np.asarray(fr.Th, np.float64)
            stats.append({"frame": fr.name, **{k: round(float(v), 6) for k, v in st.items()}})
        todo = [(h, i) for h in held for i in range(len(h))]
        for h, i in tqdm(todo, desc="fit held-out poses to masks", unit="frame", disable=not progress or not todo):
            fr = h[i]
            ref, st = refine_frame_pose(run.model, run.setup, fr, run.cfg, held_settings)
            held_poses[fr.name] = (np.asarray(ref.poses, np.float64).reshape(72),
                                   np.asarray(ref.Th, np.float64).reshape(3))
            held_stats.append({"frame": fr.name, "split": h.split,
                               **{k: round(float(v), 6) for k, v in st.items()}})
    refine_s = time.perf_counter() - t0

    with open(seq.mesh_infos_path, "rb") as f:
        infos = pickle.load(f)
    parents = np.asarray(run.setup.smpl.parents)
    new_poses = {}   # frame -> (poses (72,), Th (3,)) float64, every frame whose pose changes
    if knots:        # training frames: the refined knots' changes, interpolated in time
        x = np.arange(n, dtype=np.float64)
        kx = np.asarray(knots, np.float64)
        dp = np.stack([np.interp(x, kx, d_pose[:, c]) for c in range(72)], 1)
        dt = np.stack([np.interp(x, kx, d_T[:, c]) for c in range(3)], 1)
        for i, name in enumerate(seq.names):
            new_poses[name] = (np.asarray(infos[name]["poses"], np.float64).reshape(72) + dp[i],
                               np.asarray(infos[name]["Th"], np.float64).reshape(3) + dt[i])
    new_poses.update(held_poses)
    for name, (poses, Th) in new_poses.items():
        info = dict(infos[name])
        info["poses"] = poses.astype(np.float32)
        info["Th"] = Th.astype(np.float32)
        if "tpose_joints" in info:
            _, posed = forward_kinematics(axis_angle_to_matrix(poses.reshape(24, 3)),
                                          np.asarray(info["tpose_joints"], np.float64), parents)
            info["joints"] = posed.astype(np.float32)
        infos[name] = info

    rot = np.degrees(np.linalg.norm(d_pose.reshape(-1, 24, 3), axis=2))
    mean_of = lambda rows, key: float(np.mean([r[key] for r in rows])) if rows else None  # noqa: E731
    report = {
        "run": str(run_dir.resolve()), "source": str(src.resolve()),
        "settings": {"every": int(every), **dataclasses.asdict(settings)},
        "refined_frames": len(knots), "training_frames": n,
        "untouched_frames": len(infos) - len(new_poses),
        "mean_joint_rotation_change_deg": round(float(rot.mean()), 4) if knots else None,
        "mean_translation_change_mm": round(float(1e3 * np.linalg.norm(d_T, axis=1).mean()), 3) if knots else None,
        "loss_first_mean": mean_of(stats, "loss_first"), "loss_last_mean": mean_of(stats, "loss_last"),
        "refine_s": round(refine_s, 1), "frames": stats,
        "held_out": {"steps": int(held_out), "objective": "silhouette", "refined_frames": len(held_stats),
                     "loss_first_mean": mean_of(held_stats, "loss_first"),
                     "loss_last_mean": mean_of(held_stats, "loss_last"), "frames": held_stats},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    tmp = Path(tempfile.mkdtemp(prefix=staging_prefix(out, "tmp"), dir=out.parent))
    try:
        for kind in ("images", "masks"):
            (tmp / kind).mkdir()
            for name in seq.all_names:
                _link_or_copy(src / kind / f"{name}.png", tmp / kind / f"{name}.png")
        for name in ("cameras.pkl", "canonical_joints.pkl"):
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
        with open(tmp / "mesh_infos.pkl", "wb") as f:
            pickle.dump(infos, f, protocol=4)
        import json

        (tmp / REFINED_REPORT).write_text(json.dumps(report, indent=2) + "\n")
        os.chmod(tmp, default_mode(is_dir=True))
        publish_folder(tmp, out, recheck=lambda: check_replaceable(
            out, _refined_is_ours, protect=protect, what="refined sequence folder"))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report
