"""The training loop of ``fmgs-train`` (foundation model: eq. 13-14 losses).

Each iteration draws one training frame, poses the avatar (forward LBS), renders
it with the 2DGS rasteriser and minimises ``(1-l) L1 + l D-SSIM`` (eq. 13,
``l = 0.2``) plus ``lambda_mask * BCE(alpha, mask)`` (eq. 14). Progress is shown
with tqdm and logged to TensorBoard (``RUN_DIR/tb``); checkpoints are written
atomically every ``train.checkpoint_every`` iterations, at the end, and when the
run is interrupted (Ctrl-C), after which ``fmgs-train --resume RUN_DIR`` continues.
"""
from __future__ import annotations

import json
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from fmgs.body_model import SMPLModel, load_smpl, star_pose
from fmgs.errors import FmgsInputError
from fmgs.surfels import CanonicalSurfels, build_canonical_surfels
from fmgs.trainer.engine.checkpoint import load_checkpoint, restore_rng, save_checkpoint
from fmgs.config import save_config
from fmgs.trainer.data.humannerf import HumanNeRFSequence
from fmgs.trainer.losses.terms import mask_bce_loss, photometric_loss
from fmgs.trainer.engine.metrics import psnr
from fmgs.trainer.models.foundation import SurfelAvatar, frame_bone_transforms
from fmgs.trainer.losses.objectives import semantic_weights_only
from fmgs.trainer.render.dispatch import RenderOutput, rasterize_surfels


@dataclass
class AvatarSetup:
    """Everything derived from the data that the model and the renderer need.

    Attributes:
        smpl: body model.
        betas: (10,) shape of the subject.
        rest_joints: (24, 3) shaped rest-pose joints (body frame, metres).
        surfels: canonical surfels in the canonical pose.
        canonical_G: (24, 4, 4) relative bone transforms of the canonical pose.
    """

    smpl: SMPLModel
    betas: np.ndarray
    rest_joints: np.ndarray
    surfels: CanonicalSurfels
    canonical_G: np.ndarray


def open_sequence(cfg: DictConfig, split: str) -> HumanNeRFSequence:
    """Open the configured HumanNeRF-format sequence for ``split`` ('train' | 'test')."""
    d = cfg.data
    return HumanNeRFSequence(
        d.root, split=split, image_size=int(d.image_size), background=tuple(d.background),
        undistort=bool(d.undistort), smpl_path=d.smpl_path,
        split_config={"train_range": tuple(d.train_range), "train_step": int(d.train_step),
                      "test_range": tuple(d.test_range), "test_step": int(d.test_step)},
    )


def build_setup(cfg: DictConfig, seq: HumanNeRFSequence) -> AvatarSetup:
    """Load SMPL, recover the subject's shape and build the canonical surfels."""
    smpl = load_smpl(cfg.data.smpl_path)
    betas = np.asarray(seq.betas, np.float64)
    s = cfg.surfels
    if s.canonical_pose == "star":
        cano = star_pose(float(s.star_angle_deg))
    elif s.canonical_pose == "tpose":
        cano = np.zeros((24, 3))
    else:
        raise FmgsInputError(f"surfels.canonical_pose must be 'star' or 'tpose', got {s.canonical_pose!r}")
    parts = Path(cfg.data.parts_path) if cfg.data.parts_path else None
    surfels = build_canonical_surfels(
        smpl, betas, canonical_pose=cano, subdivisions=int(s.subdivisions),
        parts_path=parts if parts is not None and parts.is_file() else None,
        scale_multiplier=float(s.scale_multiplier),
    )
    return AvatarSetup(smpl, betas, np.asarray(surfels.rest_joints, np.float64), surfels, np.asarray(surfels.bone_transforms, np.float64))


def is_full(cfg: DictConfig) -> bool:
    """True for ``model.kind=full`` (the paper's model), False for the foundation model.

    Raises:
        FmgsInputError: an unknown ``model.kind``.
    """
    if cfg.model.kind not in ("foundation", "full"):
        raise FmgsInputError(f"model.kind must be 'foundation' or 'full', got {cfg.model.kind!r}")
    return cfg.model.kind == "full"


def build_model(cfg: DictConfig, setup: AvatarSetup, num_frames: int = 0) -> torch.nn.Module:
    """The avatar module for this config: :class:`SurfelAvatar` (foundation) or
    :class:`fmgs.trainer.models.full.FMGSAvatar` (full; ``num_frames`` training frames get a
    pose correction)."""
    if is_full(cfg):
        from fmgs.trainer.models.full import FMGSAvatar, FullModelConfig

        f = cfg.model.full
        return FMGSAvatar(setup.surfels, FullModelConfig(
            use_geometry_field=bool(f.geometry_field), use_skinning_field=bool(f.skinning_field),
            use_semantic_field=bool(f.semantic_field),
            geometry_width=int(f.get("geometry_width", 64)),
            appearance_hidden=int(f.get("appearance_hidden", 1)),
            skinning_query=str(f.get("skinning_query", "canonical")),
            skinning_subset=float(f.get("skinning_subset", 0.25)),
            use_pose_correction=bool(f.pose_correction) and num_frames > 0, num_frames=int(num_frames),
            static_offsets=bool(f.get("static_offsets", False)),
            max_displacement=float(f.get("max_displacement", 0.0)),
            pose_noise_std=float(f.get("pose_noise_std", 0.1)), pose_noise_p=float(f.get("pose_noise_p", 0.5)),
            init_opacity=float(cfg.surfels.init_opacity)))
    return SurfelAvatar(setup.surfels, cfg.model, init_opacity=float(cfg.surfels.init_opacity))


#: Parameter groups whose learning rate follows ``train.lr_final_ratio`` (:func:`lr_factor`):
#: the networks (hash grids, MLPs, pose correction) and the surfel positions, as 3DGS-Avatar
#: decays its networks' rates and its Gaussians' position rate; opacity and scale rates stay.
DECAYED_GROUPS = ("hash_grid", "mlp", "pose", "displacement")


def lr_factor(cfg: DictConfig, iteration: int) -> float:
    """Learning-rate multiplier at ``iteration``: ``r ** (iteration / train.iterations)`` with
    ``r = train.lr_final_ratio`` (exponential decay to ``r`` times the initial rate at the last
    iteration, 3DGS-Avatar's ``ExponentialLR`` with ``gamma = lr_ratio ** (1 / iterations)``);
    1 when ``r >= 1`` (no decay). A function of the iteration only, so resuming is exact."""
    r = float(cfg.train.get("lr_final_ratio", 1.0) or 1.0)
    if r >= 1.0:
        return 1.0
    return r ** (float(iteration) / max(int(cfg.train.iterations), 1))


def apply_lr_schedule(cfg: DictConfig, opt: torch.optim.Optimizer, iteration: int) -> None:
    """Set the rates of the :data:`DECAYED_GROUPS` for ``iteration`` (``initial_lr * lr_factor``)."""
    f = lr_factor(cfg, iteration)
    for g in opt.param_groups:
        if g.get("name") in DECAYED_GROUPS:
            g["lr"] = g.setdefault("initial_lr", g["lr"]) * f     # setdefault: checkpoints from before


def make_optimizer(cfg: DictConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Adam over the model's parameter groups with the ``train.lr`` learning rates (each group
    also keeps its ``initial_lr`` for :func:`apply_lr_schedule`)."""
    lr = cfg.train.lr
    if is_full(cfg):
        groups = model.param_groups(lr_grid=lr.hash_grid, lr_mlp=lr.mlp, lr_opacity=lr.opacity, lr_pose=lr.pose,
                                    lr_scale=lr.scale, lr_displacement=lr.displacement)
    else:
        groups = model.param_groups(lr)
    for g in groups:
        g["initial_lr"] = g["lr"]
    return torch.optim.Adam(groups, eps=1e-15)


def semantic_iteration(cfg: DictConfig, iteration: int) -> bool:
    """Whether training iteration ``iteration`` (0-based) evaluates the semantic branch: every
    ``loss.semantic_every``-th one (1 = all). With ``train.semantic_weights_only`` the semantic
    losses reach nothing but the semantic field, so skipping them elsewhere leaves every other
    parameter's updates unchanged; only the semantic field is trained less often."""
    k = int(cfg.loss.get("semantic_every", 1) or 1)
    return k <= 1 or iteration % k == 0


def pose_and_render(model, setup: AvatarSetup, frame, cfg: DictConfig, frame_id: int | None = None,
                    training: bool = False, semantic: bool = True):
    """Pose the avatar for ``frame`` and render it; returns ``(RenderOutput, posed)``.

    Args:
        frame_id: index of ``frame`` in the training split (full model's pose correction);
            None for held-out frames.
        training: full model only: apply training-time pose noise.
        semantic: full model only: evaluate and render the semantic field (False: no
            semantic logits this time, see :func:`semantic_iteration`).
    """
    if is_full(cfg):
        from fmgs.trainer.models.full import canonical_pose_joints, pose_frame, render_full

        pc = model.pose_correction if frame_id is not None else None
        rot, B = pose_frame(frame.poses, frame_id if pc is not None else None, pc, setup.rest_joints,
                            setup.canonical_G, frame.world_from_body)
        cam = frame.camera
        posed = model(rot, B, torch.as_tensor(cam.center, dtype=torch.float32),
                      torch.as_tensor(canonical_pose_joints(setup.surfels), dtype=torch.float32), training=training,
                      semantic=semantic)
        out = render_full(posed, cam, background=torch.as_tensor(np.asarray(cfg.data.background, np.float32)),
                          backend=cfg.train.backend, max_fragments=cfg.train.max_fragments,
                          semantic_weights_only=semantic_weights_only(cfg))
        return out, posed
    return render_frame(model, setup, frame, cfg), None


def render_frame(model, setup: AvatarSetup, frame, cfg: DictConfig) -> RenderOutput:
    """Pose the avatar for ``frame`` (a :class:`fmgs.trainer.data.humannerf.Frame`) and render it.

    Returns:
        The rasteriser output at the frame's camera resolution, background from the config.
    """
    if is_full(cfg):
        return pose_and_render(model, setup, frame, cfg)[0]
    B = frame_bone_transforms(setup.smpl, setup.rest_joints, setup.canonical_G, frame.poses, frame.world_from_body)
    cam = frame.camera
    posed = model(torch.as_tensor(B, dtype=torch.float32), torch.as_tensor(cam.center, dtype=torch.float32))
    bg = torch.as_tensor(np.asarray(cfg.data.background, np.float32))
    return rasterize_surfels(
        posed.means, posed.rotations, posed.scales, posed.opacities, posed.colors,
        torch.as_tensor(cam.K, dtype=torch.float32), torch.as_tensor(cam.viewmat, dtype=torch.float32),
        int(cam.width), int(cam.height), background=bg, backend=cfg.train.backend,
        max_fragments=cfg.train.max_fragments,
    )


class _GracefulInterrupt:
    """Turn the first SIGINT/SIGTERM into a flag so the loop can checkpoint and exit cleanly."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        def handler(signum, _frame):
            if self.requested:  # second Ctrl-C: give up immediately
                raise KeyboardInterrupt
            self.requested = True
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, handler)
            except ValueError:  # not in the main thread
                pass
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


def quick_eval(model, setup, seq, cfg, max_frames: int) -> dict:
    """Held-out PSNR on up to ``max_frames`` evenly spaced frames of ``seq`` (no grad)."""
    idx = np.unique(np.linspace(0, len(seq) - 1, num=min(max_frames, len(seq))).round().astype(int))
    vals = []
    with torch.no_grad():
        for i in idx:
            fr = seq[int(i)]
            out = render_frame(model, setup, fr, cfg)
            vals.append(psnr(out.rgb.clamp(0, 1).numpy(), fr.image))
    return {"psnr": float(np.mean(vals)), "frames": int(len(idx))}


def train(cfg: DictConfig, run_dir: Path, resume: bool = False) -> Path:
    """Train (or resume) an avatar into ``run_dir``.

    Args:
        cfg: full run configuration (see ``assets/configs/default.yaml``).
        run_dir: output folder (created).
        resume: continue from ``run_dir/checkpoints/last.pt``.

    Returns:
        ``run_dir``.

    Raises:
        FmgsInputError: bad data or configuration (names the file).
    """
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.train.threads:
        torch.set_num_threads(int(cfg.train.threads))
    if not resume:
        save_config(cfg, run_dir / "config.yaml")
    torch.manual_seed(int(cfg.train.seed))
    np.random.seed(int(cfg.train.seed))

    train_seq = open_sequence(cfg, "train")
    test_seq = open_sequence(cfg, "test")
    setup = build_setup(cfg, train_seq)
    full = is_full(cfg)
    model = build_model(cfg, setup, num_frames=len(train_seq))
    opt = make_optimizer(cfg, model)
    priors = None
    if full:
        from fmgs.priors import load_priors
        from fmgs.trainer.losses.coordinated import coordinated_backward
        from fmgs.trainer.losses.objectives import full_loss_groups

        priors = load_priors(cfg.data.root, train_seq.names, int(cfg.data.image_size), cfg.data.priors_dir)

    start_it, elapsed = 0, 0.0
    if resume:
        state = load_checkpoint(run_dir)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start_it, elapsed = int(state["iteration"]), float(state["elapsed_s"])
        restore_rng(state)
        print(f"resuming {run_dir} from iteration {start_it} ({elapsed / 60:.1f} min trained)")
    else:  # issue 7: optional initialisation (init.kind; trainer/init/aggregate.py); its time counts as training
        from fmgs.trainer.init.aggregate import apply_init

        elapsed = apply_init(cfg, model, setup, train_seq, test_seq, run_dir)

    total = int(cfg.train.iterations)
    writer = SummaryWriter(str(run_dir / "tb"), purge_step=start_it if resume else None)
    tc = cfg.train
    progress_file = run_dir / "progress.jsonl"
    eval_every = int(tc.eval_every or 0)
    print(f"fmgs-train: {model.num_surfels} surfels, {len(train_seq)} training frames, "
          f"{total} iterations -> {run_dir}")

    it = start_it
    with _GracefulInterrupt() as stop, tqdm(total=total, initial=start_it, desc="train", unit="it",
                                             dynamic_ncols=True, disable=None) as bar:
        t_last = time.perf_counter()
        budget_s = float(tc.max_minutes) * 60.0 if tc.max_minutes else float("inf")
        while it < total and not stop.requested:
            if elapsed >= budget_s:
                print(f"\ntime budget of {tc.max_minutes} min reached at iteration {it}")
                total = it
                break
            # The frame of iteration `it` depends only on (seed, it), so a resumed run
            # sees exactly the frames an uninterrupted one would.
            idx = int(np.random.default_rng([int(tc.seed), it]).integers(len(train_seq)))
            fr = train_seq[idx]
            gt = torch.from_numpy(fr.image)
            opt.zero_grad(set_to_none=True)
            if full:
                gen = torch.Generator().manual_seed(int(tc.seed) * 1_000_003 + it)
                out, posed = pose_and_render(model, setup, fr, cfg, frame_id=idx, training=True,
                                             semantic=semantic_iteration(cfg, it))
                groups = full_loss_groups(cfg, out, posed, model, fr, priors[idx], it, generator=gen)
                loss = sum(groups.values())
                coordinated_backward(posed.render_inputs(), groups, enabled=bool(tc.coordinated))
            else:
                mask = torch.from_numpy(fr.mask)
                out = render_frame(model, setup, fr, cfg)
                groups = {"photometric": photometric_loss(out.rgb, gt, lambda_ssim=float(tc.lambda_ssim)),
                          "mask_bce": float(tc.lambda_mask) * mask_bce_loss(out.alpha, mask)}
                loss = sum(groups.values())
                loss.backward()
            if tc.grad_clip and tc.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), float(tc.grad_clip))
            apply_lr_schedule(cfg, opt, it)
            opt.step()
            it += 1
            now = time.perf_counter()
            elapsed += now - t_last
            t_last = now
            bar.update(1)
            if it % int(tc.log_every) == 0 or it == total:
                with torch.no_grad():
                    p = psnr(out.rgb.detach().clamp(0, 1).numpy(), fr.image)
                bar.set_postfix(loss=f"{loss.item():.4f}", psnr=f"{p:.2f}")
                writer.add_scalar("loss/total", loss.item(), it)
                for name, val in groups.items():
                    writer.add_scalar(f"loss/{name}", float(val.detach()), it)
                writer.add_scalar("train/psnr", p, it)
                writer.add_scalar("train/seconds_per_iteration", elapsed / it, it)
            if int(tc.image_every) and it % int(tc.image_every) == 0:
                side = torch.cat([gt, out.rgb.detach().clamp(0, 1)], dim=1)
                writer.add_image("train/gt_vs_render", side.permute(2, 0, 1), it)
            if eval_every and (it % eval_every == 0 or it == total):
                q = quick_eval(model, setup, test_seq, cfg, int(tc.eval_frames))
                writer.add_scalar("heldout/psnr", q["psnr"], it)
                with open(progress_file, "a") as f:
                    f.write(json.dumps({"iteration": it, "elapsed_s": round(elapsed, 2), **q}) + "\n")
                t_last = time.perf_counter()  # do not count evaluation as training time
            if int(tc.checkpoint_every) and it % int(tc.checkpoint_every) == 0 and it < total:
                save_checkpoint(run_dir, model, opt, it, elapsed)
                t_last = time.perf_counter()

    save_checkpoint(run_dir, model, opt, it, elapsed)
    writer.flush()
    writer.close()
    if it < total:
        print(f"\ninterrupted at iteration {it}/{total}; checkpoint saved to {run_dir}/checkpoints/last.pt\n"
              f"continue with:  fmgs-train --resume {run_dir}", file=sys.stderr)
        raise KeyboardInterrupt
    print(f"training done: {it} iterations in {elapsed / 60:.1f} min "
          f"({elapsed / max(it - start_it, 1):.2f} s/it this session)")
    return run_dir
