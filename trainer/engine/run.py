"""What train, eval, export and initialisation share: opening the data, building the subject
and the model, the optimiser, loading a trained run, and the one held-out rendering loop.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from omegaconf import DictConfig

from fmgs.body_model import load_smpl, star_pose
from fmgs.config import load_run_config
from fmgs.errors import FmgsInputError
from fmgs.surfels import build_canonical_surfels
from fmgs.trainer.data.humannerf import Frame, HumanNeRFSequence
from fmgs.trainer.engine.checkpoint import checkpoint_path, load_checkpoint
from fmgs.trainer.engine.metrics import psnr
from fmgs.trainer.models.base import AvatarModel, AvatarSetup
from fmgs.trainer.models.densify import replay_on_model
from fmgs.trainer.models.foundation import SurfelAvatar
from fmgs.trainer.models.full import FMGSAvatar
from fmgs.trainer.render.dispatch import resolve_backend
from fmgs.trainer.render.types import RenderOutput

#: ``model.kind`` -> the avatar class that implements it (the one table of model kinds).
MODELS: dict[str, type[AvatarModel]] = {cls.kind: cls for cls in (SurfelAvatar, FMGSAvatar)}


def open_sequence(cfg: DictConfig, split: str) -> HumanNeRFSequence:
    """Open the configured HumanNeRF-format sequence for ``split`` ('train' | 'val' | 'test').

    Raises:
        FmgsInputError: missing or corrupt files (names the file), or a split that selects
            no frame (names the ``data.*_range`` key and the sequence's frame count).
    """
    d = cfg.data
    seq = HumanNeRFSequence(
        d.root, split=split, image_size=int(d.image_size), background=tuple(d.background),
        undistort=bool(d.undistort), smpl_path=d.smpl_path,
        split_config={"train_range": tuple(d.train_range), "train_step": int(d.train_step),
                      "test_range": tuple(d.test_range), "test_step": int(d.test_step),
                      "val_fraction": float(d.val_fraction), "val_step": int(d.val_step)},
    )
    if len(seq) == 0:
        key = "train_range" if split == "val" else f"{split}_range"
        what = f" with data.val_fraction={d.val_fraction}" if split != "test" and d.val_fraction else ""
        raise FmgsInputError(f"data.{key} {list(d[key])}{what} selects no {split} frame: the sequence has "
                             f"{len(seq.all_names)} frames (0-{len(seq.all_names) - 1})", d.root)
    return seq


def heldout_split(cfg: DictConfig) -> str:
    """The split that training-time evaluation uses: ``val`` when the config carves one
    (``data.val_fraction > 0``; the validation protocol), else ``test``."""
    return "val" if float(cfg.data.val_fraction) > 0 else "test"


def check_backend(cfg: DictConfig) -> str:
    """The rasteriser back-end ``train.backend`` resolves to on this machine, for tensors on
    the device ``train.device`` resolves to (:func:`resolve_device`).

    Raises:
        FmgsInputError: ``gsplat`` asked for without CUDA or without the package (says how to
            get it), or a device that this machine does not have.
    """
    device = resolve_device(cfg)
    try:
        return resolve_backend(str(cfg.train.backend), device)
    except (RuntimeError, ValueError) as exc:
        raise FmgsInputError(f"train.backend={cfg.train.backend}: {exc}") from exc


def resolve_device(cfg: DictConfig) -> torch.device:
    """The torch device of ``train.device`` on this machine.

    ``cpu`` and ``cuda`` are taken as given (``cuda`` = the current CUDA device); ``auto`` is
    ``cuda`` when the rasteriser back-end resolves to gsplat (``train.backend=gsplat``, or
    ``auto`` with CUDA and an importable gsplat), else ``cpu``: the reference CPU rasteriser
    keeps the model on the CPU.

    Raises:
        FmgsInputError: ``train.device=cuda`` (or ``backend=gsplat``) where torch sees no CUDA
            device, or ``backend=gsplat`` with ``device=cpu``.
    """
    from fmgs.trainer.render.dispatch import gsplat_available

    want, backend = str(cfg.train.device), str(cfg.train.backend)
    if backend == "gsplat" and want == "cpu":
        raise FmgsInputError("train.device=cpu: train.backend=gsplat renders CUDA tensors only; "
                             "use train.device=cuda or auto")
    if want == "cuda" or backend == "gsplat":
        if not torch.cuda.is_available():
            key = "train.device=cuda" if want == "cuda" else "train.backend=gsplat"
            raise FmgsInputError(f"{key}: needs a CUDA device and torch {torch.__version__} sees none "
                                 "(a CUDA build of torch and a GPU); use train.device=cpu and train.backend=cpu")
        return torch.device("cuda", torch.cuda.current_device())
    if want == "auto" and backend == "auto" and gsplat_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def to_host(out: RenderOutput) -> RenderOutput:
    """``out`` with every image detached and on the CPU (``.numpy()``-ready); the same
    object when it already is on the CPU and needs no grad."""
    fields = {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}
    if all(t is None or (t.device.type == "cpu" and not t.requires_grad) for t in fields.values()):
        return out
    return RenderOutput(**{k: None if t is None else t.detach().cpu() for k, t in fields.items()})


def build_setup(cfg: DictConfig, seq: HumanNeRFSequence) -> AvatarSetup:
    """Load SMPL, recover the subject's shape from ``seq`` and build the canonical surfels
    (paper eq. 2) in the configured canonical pose.

    Raises:
        FmgsInputError: missing or unreadable SMPL / part-label files (names the file).
    """
    smpl = load_smpl(cfg.data.smpl_path)
    betas = np.asarray(seq.betas, np.float64)
    s = cfg.surfels
    cano = star_pose(float(s.star_angle_deg)) if s.canonical_pose == "star" else np.zeros((24, 3))
    parts = Path(cfg.data.parts_path) if cfg.data.parts_path else None
    if parts is not None and not parts.is_file():
        raise FmgsInputError("data.parts_path: no such file (set data.parts_path=null to go without part "
                             "labels)", parts)
    surfels = build_canonical_surfels(
        smpl, betas, canonical_pose=cano, subdivisions=int(s.subdivisions), parts_path=parts,
        scale_multiplier=float(s.scale_multiplier),
    )
    return AvatarSetup(smpl, betas, np.asarray(surfels.rest_joints, np.float64), surfels,
                       np.asarray(surfels.bone_transforms, np.float64))


def build_model(cfg: DictConfig, setup: AvatarSetup, num_frames: int = 0) -> AvatarModel:
    """The avatar of ``model.kind`` (:data:`MODELS`) for this subject; ``num_frames`` training
    frames size its per-frame parameters (the full model's pose correction)."""
    return MODELS[str(cfg.model.kind)].from_config(cfg, setup, num_frames)


#: Parameter groups whose learning rate follows ``train.lr_final_ratio`` (:func:`lr_factor`):
#: the networks (hash grids, MLPs, pose correction) and the surfel positions, as 3DGS-Avatar
#: decays its networks' rates and its Gaussians' position rate; opacity and scale rates stay.
DECAYED_GROUPS = ("hash_grid", "mlp", "pose", "displacement", "offset")


def lr_factor(cfg: DictConfig, iteration: int) -> float:
    """Learning-rate multiplier at ``iteration``: ``r ** (iteration / train.iterations)`` with
    ``r = train.lr_final_ratio`` (exponential decay to ``r`` times the initial rate at the last
    iteration, 3DGS-Avatar's ``ExponentialLR`` with ``gamma = lr_ratio ** (1 / iterations)``);
    1 when ``r >= 1`` (no decay). A function of the iteration only, so resuming is exact."""
    r = float(cfg.train.lr_final_ratio)
    if r >= 1.0:
        return 1.0
    return r ** (float(iteration) / int(cfg.train.iterations))


def apply_lr_schedule(cfg: DictConfig, opt: torch.optim.Optimizer, iteration: int) -> None:
    """Set the rates of the :data:`DECAYED_GROUPS` for ``iteration`` (``initial_lr * lr_factor``)."""
    f = lr_factor(cfg, iteration)
    for g in opt.param_groups:
        if g.get("name") in DECAYED_GROUPS:
            g["lr"] = g.setdefault("initial_lr", g["lr"]) * f


def make_optimizer(cfg: DictConfig, model: AvatarModel) -> torch.optim.Optimizer:
    """Adam over the model's parameter groups with the ``train.lr`` rates (each group also
    keeps its ``initial_lr`` for :func:`apply_lr_schedule`)."""
    groups = model.param_groups(cfg.train.lr)
    for g in groups:
        g["initial_lr"] = g["lr"]
    return torch.optim.Adam(groups, eps=1e-15)


def render_frame(model: AvatarModel, setup: AvatarSetup, frame: Frame, cfg: DictConfig) -> RenderOutput:
    """Pose ``model`` for a held-out ``frame`` (no per-frame parameters) and render it at the
    frame's camera with the run config's background and back-end."""
    return model.render(model.pose(frame, setup), frame.camera, cfg)


def heldout_renders(model: AvatarModel, setup: AvatarSetup, seq: HumanNeRFSequence, cfg: DictConfig,
                    indices: Sequence[int] | None = None, progress: bool = False
                    ) -> Iterator[tuple[Frame, RenderOutput]]:
    """The one held-out loop: ``(frame, render)`` for each frame of ``seq`` (or of
    ``indices``), without gradients, inside :meth:`AvatarModel.frozen` (its pose-independent
    parts computed once for all the frames; consume the iterator before changing the model).
    The model renders on its own device; the renders come back on the CPU (:func:`to_host`),
    so callers score them with NumPy.

    Args:
        progress: show a tqdm bar.
    """
    from tqdm import tqdm

    idx = range(len(seq)) if indices is None else [int(i) for i in indices]
    with torch.no_grad(), model.frozen():      # pose-independent parts computed once for all frames
        for i in tqdm(idx, desc="eval", unit="frame", disable=None if progress else True):
            fr = seq[i]
            yield fr, to_host(render_frame(model, setup, fr, cfg))


def quick_eval(model, setup, seq, cfg, max_frames: int) -> dict:
    """Held-out PSNR (:func:`fmgs.trainer.engine.metrics.psnr`) on up to ``max_frames`` evenly spaced frames of ``seq`` (no grad)."""
    idx = np.unique(np.linspace(0, len(seq) - 1, num=min(max_frames, len(seq))).round().astype(int))
    vals = [psnr(out.rgb.clamp(0, 1).numpy(), fr.image) for fr, out in heldout_renders(model, setup, seq, cfg, idx)]
    return {"psnr": float(np.mean(vals)), "frames": int(len(idx))}


@dataclass
class LoadedRun:
    """A trained run, rebuilt.

    Attributes:
        run_dir: the run folder.
        cfg: resolved run config (OmegaConf).
        iteration: completed training iterations of the checkpoint.
        elapsed_s: training wall time of the checkpoint, seconds.
        setup: the subject (:class:`~fmgs.trainer.models.base.AvatarSetup`).
        model: the avatar in eval mode, float32, on :attr:`device`.
        seq: the requested split (:class:`~fmgs.trainer.data.humannerf.HumanNeRFSequence`;
            images are decoded on first access).
    """

    run_dir: Path
    cfg: Any
    iteration: int
    elapsed_s: float
    setup: AvatarSetup
    model: AvatarModel
    seq: HumanNeRFSequence
    device: torch.device = torch.device("cpu")

    @property
    def kind(self) -> str:
        """The model's kind (``foundation``, ``full``)."""
        return self.model.kind


def apply_threads(cfg: DictConfig) -> None:
    """Set torch's intra-op thread count from ``train.threads`` (null: leave torch's default).

    ``fmgs-train`` and every command that loads a run (:func:`load_run`: ``fmgs-eval``,
    ``fmgs-prep refine``, ``fmgs-export``'s baking) run on the run's setting, which
    ``--set train.threads=N`` overrides; without it two jobs on a 2-core machine each take
    both cores (measured: a silhouette-refined evaluation next to a one-thread training run
    took 1.4 cores and ran at 90-170 s per frame)."""
    if cfg.train.threads:
        torch.set_num_threads(int(cfg.train.threads))


def load_run(run_dir: str | os.PathLike, overrides: Sequence[str] = (), split: str = "train",
             device: str | torch.device | None = None) -> LoadedRun:
    """Rebuild a trained avatar from ``RUN_DIR`` (``config.yaml`` + ``checkpoints/last.pt``),
    as ``fmgs-eval`` and ``fmgs-export`` both need it.

    The model is rebuilt from the description saved with its weights
    (:meth:`~fmgs.trainer.models.base.AvatarModel.describe`: kind, training-frame count);
    checkpoints written before it was saved fall back to the pose-correction table's rows.

    Args:
        run_dir: a folder written by ``fmgs-train``.
        overrides: ``key=value`` entries over the run's config (checked like ``fmgs-train``'s:
            a misspelt key fails, naming it).
        split: the data split to open (``train`` for export, ``test`` for evaluation).
        device: where to put the model; None = what the run config's ``train.device``
            resolves to on this machine (:func:`resolve_device`). The checkpoint is read
            onto the CPU first, whatever device it was saved from.

    Torch's thread count is set from the config's ``train.threads`` (:func:`apply_threads`).

    Raises:
        FmgsInputError: not a run folder, unreadable checkpoint, data missing, an unknown or
            bad override, or a checkpoint that does not fit the model its config describes.
    """
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir, overrides)
    check_backend(cfg)
    apply_threads(cfg)
    device = resolve_device(cfg) if device is None else torch.device(device)
    state = load_checkpoint(run_dir)
    seq = open_sequence(cfg, split)
    setup = build_setup(cfg, seq)
    info = state.get("model_info") or {}
    if "num_frames" in info:
        num_frames = int(info["num_frames"])
    else:
        delta = state["model"].get("pose_correction.delta")
        num_frames = 0 if delta is None else int(delta.shape[0])
    if info.get("kind", cfg.model.kind) != cfg.model.kind:
        raise FmgsInputError(f"the checkpoint holds a {info['kind']!r} model but config.yaml says "
                             f"model.kind={cfg.model.kind!r}", checkpoint_path(run_dir))
    model = build_model(cfg, setup, num_frames=num_frames)
    replay_on_model(model, info.get("densify"))
    weights = dict(state["model"])
    if getattr(model, "offset", None) is not None and "offset" not in weights:
        # a run from before the free offsets, loaded with model.offsets.enabled=true: o = 0
        weights["offset"] = torch.zeros_like(model.offset)
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        lines = str(exc).strip().splitlines()
        detail = " ".join(line.strip() for line in lines[1:4])
        raise FmgsInputError(
            "checkpoint does not fit the model its config.yaml describes (the run was trained with other "
            f"settings; pass them with --set KEY=VALUE): {detail}", checkpoint_path(run_dir)) from exc
    model.eval().to(device)
    return LoadedRun(run_dir, cfg, int(state["iteration"]), float(state["elapsed_s"]), setup, model, seq, device)
