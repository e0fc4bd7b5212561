"""The run configuration: one typed schema, the single source of every default.

The schema is a tree of dataclasses (:class:`Config` at the root), turned into an
OmegaConf config with ``OmegaConf.structured`` (smplx / nerfstudio style): every key has
a type, a default and a line of documentation here, and OmegaConf rejects an unknown key
or a value of the wrong type. A user config (a YAML path, or the name of a file in
``assets/configs``) only overrides, then ``key=value`` command-line overrides (OmegaConf
dot-list syntax, e.g. ``train.iterations=500``) are applied, then :func:`validate` checks
ranges and choices. Every failure is an :class:`~fmgs.errors.FmgsInputError` naming the key
(and the file), so the CLIs print one line and exit 2.

Data paths are made absolute when a run starts (:func:`absolute_paths`), so a run folder's
``config.yaml`` works from any directory.

Torch-free: the trainer, the exporter and the tools all read their settings through here.
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fmgs.assets import CONFIG_DIR
from fmgs.errors import FmgsInputError

_DATA = "${oc.env:FMGS_DATA,../shared/data}"


@dataclass
class DataConfig:
    """``data``: the HumanNeRF-format sequence and its protocol.

    Attributes:
        root: sequence folder (``cameras.pkl``, ``mesh_infos.pkl``, ``images/``, ``masks/``).
        smpl_path: SMPL neutral model (``.pkl``; chumpy pickles load through the restricted unpickler).
        parts_path: per-face part labels of the SMPL topology (``smplh_parts_segm.pkl``); null = none.
        image_size: square training/evaluation resolution, pixels (the images are resized).
        background: background colour, RGB in [0, 1].
        undistort: undistort the images with the cameras' ``distortions``.
        priors_dir: priors folder (``docs/priors.md``); null = ``<root>/priors``. Used by ``model.kind=full``.
        train_range: ``[start, stop)`` frame indices of the training split (HumanNeRF / 3DGS-Avatar
            monocular protocol on ZJU-MoCap 377: novel poses, same camera).
        train_step: every n-th frame of the training range.
        test_range: ``[start, stop)`` frame indices of the held-out split.
        test_step: every n-th frame of the held-out range.
        val_fraction: validation protocol: the last fraction of the training range leaves
            training; every ``val_step``-th frame of it is the ``val`` split (screen settings
            and choose defaults on it, ``fmgs-eval --split val``; report test frames once per
            change). 0 = no validation split (train on the whole range).
        val_step: every n-th frame of the validation part.
    """

    root: str = _DATA + "/zju_mocap/377"
    smpl_path: str = _DATA + "/body_models/smpl/SMPL_NEUTRAL.pkl"
    parts_path: Optional[str] = _DATA + "/body_models/smpl/smplh_parts_segm.pkl"
    image_size: int = 512
    background: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    undistort: bool = True
    priors_dir: Optional[str] = None
    train_range: list[int] = field(default_factory=lambda: [0, 455])
    train_step: int = 1
    test_range: list[int] = field(default_factory=lambda: [455, 570])
    test_step: int = 5
    val_fraction: float = 0.0
    val_step: int = 5


@dataclass
class SurfelConfig:
    """``surfels``: the canonical surfels (paper eq. 2).

    Attributes:
        canonical_pose: ``star`` (3DGS-Avatar: hips +-45 deg about z) or ``tpose``.
        star_angle_deg: hip angle of the star pose, degrees.
        subdivisions: midpoint subdivisions of the SMPL template (1 -> 55,104 surfels).
        scale_multiplier: factor on the initial surfel scales.
        init_opacity: initial opacity of every surfel, in (0, 1).
    """

    canonical_pose: str = "star"
    star_angle_deg: float = 45.0
    subdivisions: int = 1
    scale_multiplier: float = 1.0
    init_opacity: float = 0.9


@dataclass
class HashGridSettings:
    """``model.hash_grid``: multiresolution hash encoding (Instant-NGP; 3DGS-Avatar's sizes).
    The foundation model's appearance grid and the full model's three property grids.

    Attributes:
        n_levels: resolution levels.
        n_features_per_level: features per level (output: ``n_levels * n_features_per_level``).
        log2_hashmap_size: log2 of the entries per level.
        base_resolution: coarsest grid resolution.
        max_resolution: finest grid resolution.
    """

    n_levels: int = 16
    n_features_per_level: int = 2
    log2_hashmap_size: int = 16
    base_resolution: int = 16
    max_resolution: int = 2048


@dataclass
class FoundationSettings:
    """``model.foundation``: the foundation model only.

    Attributes:
        color_mlp_width: hidden width of the colour MLP (3DGS-Avatar: 64).
        color_mlp_layers: hidden layers of the colour MLP (3DGS-Avatar: 2).
        learn_displacement: learn the static normal displacement (the pose-free part of eq. 4).
    """

    color_mlp_width: int = 64
    color_mlp_layers: int = 2
    learn_displacement: bool = True


@dataclass
class FullSettings:
    """``model.full``: the full model (paper eq. 3-21; the switches are Table 3's ablations).

    Attributes:
        geometry_field: pose-dependent geometry residual, eq. 3-6.
        geometry_width: width of the "lightweight" geometry MLP (32; the paper gives no
            width). Chosen on the validation splits against 64 (docs/benchmarks.md, sixth
            round): -0.03 dB [-0.10, +0.08] on female-3-casual, +0.36 dB on male-3-casual,
            +0.02 dB [-0.03, +0.09] on 377 (no loss on any subject); the full avatar's
            inference -25 to -40% and playback 33 vs 25 FPS at 512^2 (2-core CPU).
        geometry_hidden: hidden layers of the geometry MLP (2; the paper only says
            "lightweight", and its colour MLP has one). At width 64, 1 played the full avatar
            ~14% faster (32-33 vs 28-30 FPS at 512^2, 2-core CPU) at -0.02 / -0.20 dB on the
            two PeopleSnapshot validation splits (not significant) and -0.19 dB on 377's
            (significant; docs/benchmarks.md, fifth round).
        appearance_hidden: hidden layers (width 64) of the colour MLP (eq. 7: one).
        skinning_field: neural skinning, eq. 9 (off: SMPL weights).
        skinning_query: ``canonical`` (W at mu, precomputed lookup, exact bake) or
            ``corrected`` (the paper: W at mu').
        skinning_subset: canonical query: fraction of the surfels' weights recomputed per
            iteration, in (0, 1] (1 = all).
        semantic_field: semantic field, eq. 8.
        pose_correction: learnable per-frame pose correction theta_p (default on; turned off,
            as the paper runs PeopleSnapshot, the avatar loses 0.5 dB on every validation frame
            of both PeopleSnapshot subjects at mask-fitted held-out poses; docs/benchmarks.md,
            eighth round).
        pose_correction_every: training frames between the correction's knots (piecewise
            linear in time; 1 = one correction per frame, the paper).
        pose_input: what the pose encoder reads of each joint rotation ``R``: ``relative`` =
            ``(R - I) / pose_input_scale`` (zero at rest; see ``HierarchicalPoseEncoder``), or
            ``rotation`` = the raw entries (LEAP / 3DGS-Avatar; learns a nearly constant Z_p).
        pose_input_scale: divisor of ``R - I`` in the relative mode (> 0).
        pose_noise_std: training pose augmentation N(0, std^2) on the encoder's rotation entries ...
        pose_noise_p: ... applied with this probability per iteration (3DGS-Avatar).
        skinning_pose_noise_deg: training pose augmentation on the *skinning* pose: i.i.d.
            ``N(0, sigma^2)`` (degrees) on every axis-angle component of the training frame's
            SMPL pose (all 24 joints) before its pose correction, every iteration, so the
            surfels are posed (eq. 10-12) and encoded at a slightly wrong pose; 0 = off.
            Meant to make the avatar tolerate the error of a held-out frame's monocular fit,
            which the per-frame correction only removes on training frames; measured, it does
            not: 0.5 / 1 / 2 degrees cost 0.3 / 0.9 / 4.7 dB (female-3-casual) and 0.7 / 1.4 /
            3.4 dB (male-3-casual) on the validation splits (docs/benchmarks.md, seventh
            round), so it stays off.
        max_displacement: soft bound (m) of the field's normal displacement delta_d,
            ``d_max tanh(delta_d / d_max)``; 0 = unbounded (the paper's eq. 4; default: a 2 cm
            bound saturated on ~99 % of the surfels within 300 iterations, which zeroes the
            gradient of delta_d and so its pose dependence; docs/benchmarks.md).
        static_offsets: per-surfel pose-free displacement and log-scale under the field.
    """

    geometry_field: bool = True
    geometry_width: int = 32
    geometry_hidden: int = 2
    appearance_hidden: int = 1
    skinning_field: bool = True
    skinning_query: str = "canonical"
    skinning_subset: float = 0.25
    semantic_field: bool = True
    pose_correction: bool = True
    pose_correction_every: int = 1
    pose_input: str = "relative"
    pose_input_scale: float = 0.1
    pose_noise_std: float = 0.1
    pose_noise_p: float = 0.5
    skinning_pose_noise_deg: float = 0.0
    max_displacement: float = 0.0
    static_offsets: bool = True


@dataclass
class OffsetSettings:
    """``model.offsets``: learnable per-surfel canonical offsets for geometry that leaves the
    body (hoods, hems, skirts, loose sweaters, hair). Both models.

    ``mu_b = mu + n d + o``: a free 3-vector ``o`` (metres, canonical frame) per surfel on top
    of the static normal displacement ``d``, with no hard bound. What keeps it honest: the
    silhouette (mask BCE of eq. 14), the normal terms of the full model, and an umbrella-
    Laplacian smoothness over the surfel adjacency of the mesh (:func:`fmgs.trainer.losses.
    terms.offset_laplacian_loss`), which leaves constant and linearly varying offsets
    free (a garment standing off the body) and penalises wrinkles and lone surfels.

    Attributes:
        enabled: learn the offsets ``o`` (off: ``o = 0``, the template surfels + ``d``).
        lr: Adam rate of ``o`` (metres per step at most; decayed like the positions).
        lambda_laplacian: weight of the Laplacian smoothness, per squared metre (>= 0).
    """

    enabled: bool = False
    lr: float = 5.0e-4
    lambda_laplacian: float = 3.0e4


@dataclass
class DensifySettings:
    """``model.densify``: mesh-guided densification (:mod:`fmgs.densify`), both models.

    At each of the iterations ``round(f * train.iterations)`` for ``f`` in ``at``, the
    faces of the canonical mesh whose surfels carry the largest mean image-space gradient
    of their posed centres (3DGS's criterion, in pixels), or the largest uncovered mask
    around their projection, are split 1-to-4; the surfel count changes only there, so
    the final buffer is fixed (export, runtime).

    Attributes:
        at: fractions of ``train.iterations`` (in (0, 1)) after which to densify; [] = never.
        fraction: share of the current surfels split per step (each adds 3 surfels).
        coverage_share: share of that budget given to the under-coverage criterion
            (the rest goes to the gradient criterion).
        coverage_radius: half-width (pixels) of the window in which a surfel's projection
            looks for mask pixels the render leaves uncovered.
        max_surfels: cap on the surfel count (the runtime's frame rate pays for every surfel).
        prune_opacity: at each step also drop the surfels whose opacity is below this
            (0 = none): nearly transparent surfels pay for the new ones at playback.
        final_prune_opacity: after the last iteration, drop the surfels whose opacity is
            below this (0 = keep all; densification need not be on). Chosen on the
            validation split (docs/benchmarks.md, "End-of-training pruning"): 0.02 drops
            about a fifth of the surfels at no validation PSNR cost, and the runtime pays
            for every surfel.
    """

    at: list[float] = field(default_factory=list)
    fraction: float = 0.03
    coverage_share: float = 0.5
    coverage_radius: int = 4
    max_surfels: int = 70000
    prune_opacity: float = 0.0
    final_prune_opacity: float = 0.02


@dataclass
class ModelConfig:
    """``model``: which avatar and its sizes.

    Attributes:
        kind: ``foundation`` (appearance hash grid + colour MLP, SMPL skinning) or ``full``
            (the paper's model: eq. 3-21, coordinated training).
        hash_grid: hash-grid sizes (both models).
        view_dependent: colour depends on the canonicalised view direction (both models).
        sh_degree: degree of its real SH basis (both models).
        foundation: settings of the foundation model.
        full: settings of the full model.
        offsets: learnable canonical offsets (both models).
        densify: mesh-guided densification (both models).
    """

    kind: str = "foundation"
    hash_grid: HashGridSettings = field(default_factory=HashGridSettings)
    view_dependent: bool = True
    sh_degree: int = 3
    foundation: FoundationSettings = field(default_factory=FoundationSettings)
    full: FullSettings = field(default_factory=FullSettings)
    offsets: OffsetSettings = field(default_factory=OffsetSettings)
    densify: DensifySettings = field(default_factory=DensifySettings)


@dataclass
class InitConfig:
    """``init``: the instant avatar (``fmgs-train --preview``) and the warm start
    (``init.kind=aggregate``): every training frame fused onto the surfels (``docs/aggregate.md``).

    Attributes:
        kind: ``none`` or ``aggregate`` (warm-start the foundation model's appearance).
        visibility: depth test against ``mesh`` (z-buffer of the posed upsampled mesh) or
            ``surfels`` (2DGS median depth).
        depth_tolerance: metres behind the depth map still counted visible.
        min_cos: facing test, cos(normal, direction to the camera) > min_cos.
        mask_threshold: bilinear mask value at the projection (1 = all 4 pixels in the mask).
        outlier_k: reject colours beyond ``outlier_k * 1.4826 * MAD`` (robust sigma) ...
        min_sigma: ... but never closer than this (colour units).
        irls_iters: weighted-mean / re-rejection rounds after the median start.
        max_fill_sweeps: neighbour-diffusion sweeps for surfels no frame saw.
        frame_step: use every n-th training frame.
        warmup_iters: Adam iterations fitting hash grid + colour MLP to the fused colours.
        warmup_lr_grid: learning rate of the hash grid in that fit.
        warmup_lr_mlp: learning rate of the colour MLP in that fit.
    """

    kind: str = "none"
    visibility: str = "mesh"
    depth_tolerance: float = 0.02
    min_cos: float = 0.2
    mask_threshold: float = 0.999
    outlier_k: float = 2.5
    min_sigma: float = 0.03
    irls_iters: int = 2
    max_fill_sweeps: int = 200
    frame_step: int = 5
    warmup_iters: int = 100
    warmup_lr_grid: float = 3.0e-2
    warmup_lr_mlp: float = 1.0e-2


@dataclass
class LearningRates:
    """``train.lr``: Adam learning rates per parameter group.

    Attributes:
        hash_grid: hash tables.
        mlp: MLPs (colour; full model: pose encoder, geometry, appearance, semantic, skinning).
        opacity: opacity logits.
        scale: log-scale deltas.
        displacement: static normal displacements (metres).
        pose: full model: per-frame pose correction (radians).
    """

    hash_grid: float = 1.0e-2
    mlp: float = 1.0e-3
    opacity: float = 5.0e-2
    scale: float = 5.0e-3
    displacement: float = 2.0e-4
    pose: float = 1.0e-4


@dataclass
class TrainConfig:
    """``train``: the optimisation.

    Attributes:
        iterations: training iterations (>= 1).
        max_minutes: stop (as completed) once training wall time reaches this budget; null = none.
        seed: random seed (frame order, initialisation, pose noise).
        lr: learning rates.
        lr_final_ratio: exponential decay of the network / position rates to this fraction at
            the last iteration (3DGS-Avatar: 0.01); 1 = constant.
        lambda_ssim: D-SSIM weight of eq. 13.
        lambda_mask: mask BCE weight of eq. 14 (3DGS-Avatar).
        grad_clip: gradient-norm clip (0 = off).
        coordinated: full model: coordinated training (Sec. 4.5, gradient isolation).
        semantic_weights_only: with ``coordinated``: the semantic losses reach the semantic
            field only (logits composited with constant blending weights); false = Sec. 4.5 literally.
        max_fragments: per-pixel fragment cap of the CPU rasteriser (null = exact).
        threads: torch intra-op threads (null = torch's default).
        checkpoint_every: write a checkpoint every N iterations (0 = only at the end).
        log_every: log losses every N iterations (>= 1).
        image_every: log a render every N iterations (0 = never).
        eval_every: held-out PSNR on ``eval_frames`` test frames every N iterations (0 = off).
        eval_frames: frames of that quick evaluation.
        eval_at_end: run ``fmgs-eval`` when training ends.
        backend: rasteriser: ``auto``, ``cpu`` or ``gsplat`` (CUDA).
        device: where the model, its buffers and the frames live during training and
            evaluation: ``cpu``, ``cuda`` (the current CUDA device; refused when torch sees
            none) or ``auto`` (``cuda`` when the back-end resolves to gsplat: ``backend=gsplat``,
            or ``auto`` with CUDA and gsplat present; else ``cpu``). ``backend=gsplat`` needs
            ``cuda`` or ``auto``. Checkpoints are device-free: a run trained on CUDA evaluates,
            resumes and exports on the CPU (``fmgs-export`` always works on the CPU).
    """

    iterations: int = 300
    max_minutes: Optional[float] = None
    seed: int = 0
    lr: LearningRates = field(default_factory=LearningRates)
    lr_final_ratio: float = 1.0
    lambda_ssim: float = 0.2
    lambda_mask: float = 0.1
    grad_clip: float = 0.0
    coordinated: bool = True
    semantic_weights_only: bool = True
    max_fragments: Optional[int] = None
    threads: Optional[int] = None
    checkpoint_every: int = 100
    log_every: int = 10
    image_every: int = 100
    eval_every: int = 0
    eval_frames: int = 5
    eval_at_end: bool = True
    backend: str = "auto"
    device: str = "auto"


@dataclass
class LossConfig:
    """``loss``: the full model's prior and regularisation weights (the paper gives none;
    normal terms as 2DGS, mask / skinning / isometry as 3DGS-Avatar).

    Attributes:
        lambda_depth: ordinal depth ranking, eq. 15-16.
        depth_pairs: pixel pairs per iteration of that term.
        depth_alpha: sharpness of the ranking loss.
        lambda_normal_consistency: L_sn (2DGS: 0.05).
        normal_consistency_start: L_sn from this fraction of ``train.iterations`` on (2DGS: 0.23).
        body_model_prior_scale: factor on the depth / normal PRIOR terms when the priors are
            body-model renders (they carry no information beyond the SMPL fit).
        lambda_normal_prior: L_n.
        lambda_normal_tv: eq. 17.
        lambda_semantic: eq. 19.
        lambda_semantic_reg: eq. 20 (pair-normalised).
        semantic_every: evaluate the semantic branch (eq. 8, 19, 20) every n-th iteration.
        lambda_skinning_initial: skinning regulariser weight at iteration 0 ...
        lambda_skinning_final: ... decayed to this ...
        skinning_warmup: ... over this many iterations.
        skinning_samples: mesh-surface samples of the skinning regulariser.
        lambda_isometry: isometry loss weight.
        lambda_scale_growth: weight of
            :func:`fmgs.trainer.losses.terms.scale_growth_loss` (full model: squared log-growth of
            the corrected surfel scales beyond the template's; not in the paper; 0 = off; 0.1
            chosen on the validation splits of 377 and female-3-casual: same or better PSNR,
            2.3-2.5x less draw time; docs/benchmarks.md, "Scale-growth penalty").
    """

    lambda_depth: float = 0.05
    depth_pairs: int = 4096
    depth_alpha: float = 10.0
    lambda_normal_consistency: float = 0.01
    normal_consistency_start: float = 0.0
    body_model_prior_scale: float = 0.0
    lambda_normal_prior: float = 0.05
    lambda_normal_tv: float = 0.01
    lambda_semantic: float = 0.05
    lambda_semantic_reg: float = 0.01
    semantic_every: int = 1
    lambda_skinning_initial: float = 10.0
    lambda_skinning_final: float = 0.1
    skinning_warmup: int = 1000
    skinning_samples: int = 1024
    lambda_isometry: float = 1.0
    lambda_scale_growth: float = 0.1


@dataclass
class EvalConfig:
    """``eval``: held-out evaluation (``fmgs-eval``).

    Attributes:
        video_fps: frame rate of the side-by-side videos.
        max_frames: evaluate only the first N test frames (null = all of the split).
    """

    video_fps: int = 10
    max_frames: Optional[int] = None


@dataclass
class Config:
    """The whole run configuration (``RUN_DIR/config.yaml`` is this, resolved)."""

    data: DataConfig = field(default_factory=DataConfig)
    surfels: SurfelConfig = field(default_factory=SurfelConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    init: InitConfig = field(default_factory=InitConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


#: Keys that moved (old -> new) or went (old -> None): a ``config.yaml`` of an older run still loads.
MOVED_KEYS = {
    "train.lambda_scale_reg": None,      # never read by any model: dropped
    "model.color_mlp_width": "model.foundation.color_mlp_width",
    "model.color_mlp_layers": "model.foundation.color_mlp_layers",
    "model.learn_displacement": "model.foundation.learn_displacement",
}

#: Keys added to the schema after runs were first saved (the schema of commit 9efe2f9), each with
#: the value that reproduces how a run saved before the key existed was trained. A run's
#: ``config.yaml`` holds every key of its day, so a key it lacks is one added since: resuming,
#: evaluating or exporting that run fills it with this value, not with today's default (which
#: may switch on a behaviour the run never had, e.g. the relative pose input its networks were
#: not trained on). Every key added to the schema must be listed here (a test checks it).
ADDED_KEYS = {
    "data.val_fraction": 0.0,                     # no validation split
    "data.val_step": 5,
    "train.device": "auto",
    "model.offsets.enabled": False,               # no free canonical offsets
    "model.offsets.lr": 5e-4,
    "model.offsets.lambda_laplacian": 3e4,
    "model.densify.at": [],                       # no densification
    "model.densify.fraction": 0.03,
    "model.densify.coverage_share": 0.5,
    "model.densify.coverage_radius": 4,
    "model.densify.max_surfels": 70000,
    "model.densify.prune_opacity": 0.0,
    "model.densify.final_prune_opacity": 0.0,     # no end-of-training pruning
    "model.full.geometry_hidden": 2,              # two hidden layers in the geometry MLP
    "model.full.pose_input": "rotation",          # raw rotation entries into the pose encoder
    "model.full.pose_input_scale": 0.1,
    "model.full.pose_correction_every": 1,        # one correction per training frame
    "model.full.skinning_pose_noise_deg": 0.0,    # no noise on the skinning pose
    "loss.lambda_scale_growth": 0.0,              # no scale-growth penalty
}

#: Allowed values of the string choices.
CHOICES = {
    "model.kind": ("foundation", "full"),
    "surfels.canonical_pose": ("star", "tpose"),
    "model.full.skinning_query": ("canonical", "corrected"),
    "model.full.pose_input": ("relative", "rotation"),
    "init.kind": ("none", "aggregate"),
    "init.visibility": ("mesh", "surfels"),
    "train.backend": ("auto", "cpu", "gsplat"),
    "train.device": ("auto", "cpu", "cuda"),
}

#: Numeric ranges ``(low, high, low_inclusive, high_inclusive)``; None = unbounded.
RANGES = {
    "data.image_size": (16, 8192, True, True),
    "data.train_step": (1, None, True, True),
    "data.test_step": (1, None, True, True),
    "data.val_fraction": (0.0, 0.9, True, True),
    "data.val_step": (1, None, True, True),
    "surfels.star_angle_deg": (-90.0, 90.0, True, True),
    "surfels.subdivisions": (0, 2, True, True),
    "surfels.scale_multiplier": (0.0, None, False, True),
    "surfels.init_opacity": (0.0, 1.0, False, False),
    "model.hash_grid.n_levels": (1, 32, True, True),
    "model.hash_grid.n_features_per_level": (1, 8, True, True),
    "model.hash_grid.log2_hashmap_size": (4, 24, True, True),
    "model.hash_grid.base_resolution": (1, None, True, True),
    "model.hash_grid.max_resolution": (1, None, True, True),
    "model.sh_degree": (0, 3, True, True),
    "model.foundation.color_mlp_width": (1, 4096, True, True),
    "model.foundation.color_mlp_layers": (0, 16, True, True),
    "model.full.geometry_width": (1, 4096, True, True),
    "model.full.geometry_hidden": (1, 16, True, True),
    "model.full.appearance_hidden": (0, 16, True, True),
    "model.full.skinning_subset": (0.0, 1.0, False, True),
    "model.full.pose_input_scale": (0.0, None, False, True),
    "model.full.pose_noise_std": (0.0, None, True, True),
    "model.full.pose_correction_every": (1, None, True, True),
    "model.full.pose_noise_p": (0.0, 1.0, True, True),
    "model.full.skinning_pose_noise_deg": (0.0, 30.0, True, True),
    "model.full.max_displacement": (0.0, None, True, True),
    "model.offsets.lr": (0.0, None, True, True),
    "model.offsets.lambda_laplacian": (0.0, None, True, True),
    "model.densify.fraction": (0.0, 1.0, True, True),
    "model.densify.coverage_share": (0.0, 1.0, True, True),
    "model.densify.coverage_radius": (0, 64, True, True),
    "model.densify.max_surfels": (1, None, True, True),
    "model.densify.prune_opacity": (0.0, 1.0, True, False),
    "model.densify.final_prune_opacity": (0.0, 1.0, True, False),
    "init.depth_tolerance": (0.0, None, True, True),
    "init.min_cos": (-1.0, 1.0, True, True),
    "init.mask_threshold": (0.0, 1.0, True, True),
    "init.outlier_k": (0.0, None, False, True),
    "init.min_sigma": (0.0, None, True, True),
    "init.irls_iters": (0, None, True, True),
    "init.max_fill_sweeps": (0, None, True, True),
    "init.frame_step": (1, None, True, True),
    "init.warmup_iters": (0, None, True, True),
    "train.iterations": (1, None, True, True),
    "train.max_minutes": (0.0, None, False, True),
    "train.lr_final_ratio": (0.0, 1.0, False, True),
    "train.lambda_ssim": (0.0, 1.0, True, True),
    "train.grad_clip": (0.0, None, True, True),
    "train.max_fragments": (1, None, True, True),
    "train.threads": (1, 1024, True, True),
    "train.checkpoint_every": (0, None, True, True),
    "train.log_every": (1, None, True, True),
    "train.image_every": (0, None, True, True),
    "train.eval_every": (0, None, True, True),
    "train.eval_frames": (1, None, True, True),
    "loss.depth_pairs": (1, None, True, True),
    "loss.normal_consistency_start": (0.0, 1.0, True, True),
    "loss.semantic_every": (1, None, True, True),
    "loss.skinning_warmup": (0, None, True, True),
    "loss.skinning_samples": (1, None, True, True),
    "eval.video_fps": (1, 240, True, True),
    "eval.max_frames": (1, None, True, True),
}

#: Prefixes whose every numeric value must be >= 0 (weights and learning rates).
NON_NEGATIVE = ("train.lr.", "train.lambda_", "loss.lambda_", "init.warmup_lr_")


def resolve_config_path(name_or_path: str) -> Path:
    """Map a config name (``zju377_60min``) or a path to an existing YAML file.

    Raises:
        FmgsInputError: no such file, naming where it looked.
    """
    p = Path(name_or_path)
    if p.is_file():
        return p
    for cand in (CONFIG_DIR / name_or_path, CONFIG_DIR / f"{name_or_path}.yaml"):
        if cand.is_file():
            return cand
    raise FmgsInputError(
        f"config not found (looked for this path and for {CONFIG_DIR}/{name_or_path}.yaml)", p
    )


def schema() -> DictConfig:
    """The defaults as a struct-mode OmegaConf config (unknown keys and wrong types rejected)."""
    cfg = OmegaConf.structured(Config)
    OmegaConf.set_struct(cfg, True)
    return cfg


def _message(exc: Exception) -> str:
    """The first line of an OmegaConf error, with its full key when it has one."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
    key = getattr(exc, "full_key", None)
    return f"{key}: {text}" if key and key not in text else text


def _migrate(node: DictConfig) -> DictConfig:
    """Move the keys of :data:`MOVED_KEYS` in a loaded YAML to their new place."""
    for old, new in MOVED_KEYS.items():
        val = OmegaConf.select(node, old, default=None, throw_on_missing=False)
        if val is None:
            continue
        parent, leaf = old.rsplit(".", 1)
        OmegaConf.select(node, parent).pop(leaf)
        if new is not None and OmegaConf.select(node, new, default=None) is None:
            OmegaConf.update(node, new, val, force_add=True)
    return node


_ABSENT = object()


def _fill_added_keys(node: DictConfig) -> dict:
    """Give a saved run config the :data:`ADDED_KEYS` it lacks (in place).

    Returns:
        ``{key: value}`` of the filled keys whose value differs from today's default (the
        ones where the run now behaves as it was trained, not as a new run would).
    """
    defaults = schema()
    changed = {}
    for key, value in ADDED_KEYS.items():
        if OmegaConf.select(node, key, default=_ABSENT) is not _ABSENT:
            continue
        OmegaConf.update(node, key, value, force_add=True)
        if OmegaConf.select(defaults, key) != value:
            changed[key] = value
    return changed


def _merge(base: DictConfig, other, what: str, path=None) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as exc:
        raise FmgsInputError(f"invalid {what}: {_message(exc)}", path) from exc


def parse_overrides(overrides: Sequence[str]) -> DictConfig:
    """``key=value`` strings -> an OmegaConf config.

    Raises:
        FmgsInputError: an entry without ``=`` or with an empty key.
    """
    for o in overrides:
        if "=" not in o or not o.split("=", 1)[0].strip():
            raise FmgsInputError(f"override {o!r} is not of the form key=value (e.g. train.iterations=500)")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except Exception as exc:
        raise FmgsInputError(f"bad override in {list(overrides)}: {_message(exc)}") from exc


def load_config(config: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Build and validate a run configuration: schema defaults <- user config <- overrides.

    Args:
        config: optional user config (path or shipped name) merged over the defaults.
        overrides: OmegaConf dot-list strings, applied last.

    Returns:
        The merged, resolved and validated configuration (interpolations such as the data
        root from ``$FMGS_DATA`` are resolved once, so a saved run config is explicit).

    Raises:
        FmgsInputError: unknown config, unknown key, value of the wrong type or out of range,
            bad YAML (names the key and the file).
    """
    cfg = schema()
    if config:
        path = resolve_config_path(str(config))
        try:
            user = _migrate(OmegaConf.load(path))
        except Exception as exc:
            raise FmgsInputError(f"unreadable YAML: {_message(exc)}", path) from exc
        cfg = _merge(cfg, user, "config", path)
    if overrides:
        cfg = _merge(cfg, parse_overrides(overrides), "override")
    return finish(cfg, config)


def finish(cfg: DictConfig, where=None) -> DictConfig:
    """Resolve interpolations and :func:`validate` (the last step of every config load).

    Raises:
        FmgsInputError: an interpolation that cannot be resolved, or :func:`validate`'s errors.
    """
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        raise FmgsInputError(f"invalid configuration: {_message(exc)}", where) from exc
    validate(cfg, where)
    return cfg


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr)


def load_run_config(run_dir: str | os.PathLike, overrides: Sequence[str] = (),
                    notify=_to_stderr) -> DictConfig:
    """A run folder's ``config.yaml`` over the schema, with optional ``key=value`` overrides;
    the same struct-mode checks as :func:`load_config`.

    Keys added to the schema since the run was saved get the value that keeps the run's own
    behaviour (:data:`ADDED_KEYS`), not today's default; moved keys are moved (:data:`MOVED_KEYS`).

    Args:
        notify: ``callable(str)`` told, once, which added keys were filled with a value
            other than today's default (default: printed on stderr; None = silent).

    Raises:
        FmgsInputError: ``RUN_DIR/config.yaml`` missing or unreadable, an unknown key (a
            misspelt ``--set``), a wrong type or an out-of-range value.
    """
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FmgsInputError("not a run folder: config.yaml is missing (train with fmgs-train first)", path)
    try:
        saved = _migrate(OmegaConf.load(path))
        if not isinstance(saved, DictConfig):
            raise ValueError("not a mapping of config sections")
        kept = _fill_added_keys(saved)
    except Exception as exc:
        raise FmgsInputError(f"unreadable run config: {_message(exc)}", path) from exc
    if kept and notify is not None:
        notify(f"{path} predates {', '.join(kept)}: keeping the behaviour it was trained with ("
               + ", ".join(f"{k}={v}" for k, v in kept.items()) + ")")
    cfg = _merge(schema(), saved, "run config", path)
    if overrides:
        cfg = _merge(cfg, parse_overrides(overrides), "override")
    return finish(cfg, path)


def _walk(node, prefix=""):
    for k, v in node.items():
        key = f"{prefix}{k}"
        if isinstance(v, DictConfig):
            yield from _walk(v, key + ".")
        else:
            yield key, v


def validate(cfg: DictConfig, where=None) -> None:
    """Check choices (:data:`CHOICES`), ranges (:data:`RANGES`, :data:`NON_NEGATIVE`) and
    the shapes of the list-valued keys. Types were already checked by the schema.

    Raises:
        FmgsInputError: the first bad key, its value and what is allowed.
    """
    def bad(key, msg):
        raise FmgsInputError(f"{key} {msg}", where)

    values = dict(_walk(cfg))
    for key, allowed in CHOICES.items():
        if values[key] not in allowed:
            bad(key, f"must be one of {', '.join(allowed)}; got {values[key]!r}")
    for key, v in values.items():
        if isinstance(v, float) and not math.isfinite(v):
            bad(key, f"must be a finite number; got {v}")
        if key.startswith(NON_NEGATIVE) and isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0:
            bad(key, f"must be >= 0; got {v}")
    for key, (lo, hi, lo_in, hi_in) in RANGES.items():
        v = values[key]
        if v is None:
            continue
        if lo is not None and (v < lo or (v == lo and not lo_in)):
            bad(key, f"must be {'>=' if lo_in else '>'} {lo}; got {v}")
        if hi is not None and (v > hi or (v == hi and not hi_in)):
            bad(key, f"must be {'<=' if hi_in else '<'} {hi}; got {v}")
    bg = list(cfg.data.background)
    if len(bg) != 3 or any(not (0.0 <= float(c) <= 1.0) for c in bg):
        bad("data.background", f"must be 3 values in [0, 1] (RGB); got {bg}")
    for key in ("data.train_range", "data.test_range"):
        r = list(OmegaConf.select(cfg, key))
        if len(r) != 2 or r[0] < 0 or r[1] <= r[0]:
            bad(key, f"must be [start, stop) with 0 <= start < stop; got {r}")
    at = [float(f) for f in cfg.model.densify.at]
    if any(not (0.0 < f < 1.0) for f in at) or len(set(at)) != len(at):
        bad("model.densify.at", f"must be distinct fractions of train.iterations in (0, 1); got {at}")
    hg = cfg.model.hash_grid
    if hg.max_resolution < hg.base_resolution:
        bad("model.hash_grid.max_resolution", f"must be >= base_resolution ({hg.base_resolution}); got {hg.max_resolution}")
    if cfg.train.backend == "gsplat":
        if cfg.train.device == "cpu":
            bad("train.device", "must be cuda or auto with train.backend=gsplat (gsplat renders CUDA tensors "
                "only); got 'cpu'")
        _check_gsplat(where)


def _check_gsplat(where) -> None:
    """``train.backend=gsplat`` needs the gsplat package (say how to get it); the CUDA device
    is checked where torch is loaded (:func:`fmgs.trainer.engine.run.check_backend`)."""
    import importlib.util

    if importlib.util.find_spec("gsplat") is None:
        raise FmgsInputError("train.backend=gsplat: gsplat is not installed (pip install gsplat, with a CUDA "
                             "build of torch); use train.backend=cpu or auto", where)


def absolute_paths(cfg: DictConfig, base: str | os.PathLike | None = None) -> DictConfig:
    """Make the data paths of ``cfg`` absolute (relative to ``base``, default the current
    directory), so the run folder's ``config.yaml`` means the same files from anywhere.

    Raises:
        FmgsInputError: ``data.parts_path`` is set but no such file exists (a silently
            ignored part-label file would change the semantic field without a word).
    """
    root = Path(base) if base is not None else Path.cwd()
    for key in ("root", "smpl_path", "parts_path", "priors_dir"):
        v = cfg.data[key]
        if v:
            cfg.data[key] = str((root / Path(v).expanduser()).resolve())
    if cfg.data.parts_path and not Path(cfg.data.parts_path).is_file():
        raise FmgsInputError("data.parts_path: no such file (set data.parts_path=null to train without "
                             "part labels)", cfg.data.parts_path)
    return cfg


def save_config(cfg: DictConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically) so a run can be resumed or reproduced."""
    from fmgs.atomic import atomic_path

    with atomic_path(Path(path)) as tmp:
        OmegaConf.save(cfg, tmp)
