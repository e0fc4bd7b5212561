"""The one avatar-model interface that training, evaluation, initialisation and export use.

Every avatar (foundation, full, preview) is an :class:`AvatarModel`: callers build it with
:func:`build_model`, pose it for a frame, render it, ask it for its losses and its
optimiser groups, and never ask which kind it is (nerfstudio's ``Model`` seam:
``get_param_groups`` / ``get_outputs`` / ``get_loss_dict``). The exporter finds the model's
baking and ONNX code through :attr:`AvatarModel.kind` in one table
(:mod:`fmgs.export.adapters`).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from torch import nn

from fmgs.body_model import SMPLModel, bone_transforms
from fmgs.surfels import CanonicalSurfels
from fmgs.trainer.losses.objectives import semantic_weights_only
from fmgs.trainer.models.hashgrid import HashLookup
from fmgs.trainer.render.dispatch import render_posed
from fmgs.trainer.render.types import RenderOutput


@dataclass
class AvatarSetup:
    """Everything derived from the data that a model and the renderer need.

    Attributes:
        smpl: body model.
        betas: (10,) float64 shape of the subject.
        rest_joints: (24, 3) float64 shaped rest-pose joints (body frame, metres).
        surfels: canonical surfels in the canonical pose (paper eq. 2).
        canonical_G: (24, 4, 4) float64 relative bone transforms of the canonical pose.
    """

    smpl: SMPLModel
    betas: np.ndarray
    rest_joints: np.ndarray
    surfels: CanonicalSurfels
    canonical_G: np.ndarray


class Posed(Protocol):
    """What :meth:`AvatarModel.pose` returns: world-space surfels of one frame.

    ``render_inputs()`` gives the rasteriser inputs by name: ``means (S,3)`` metres,
    ``rotations (S,3,3)`` columns ``[t_u, t_v, n]``, ``scales (S,2)`` metres,
    ``opacities (S,)``, ``colors (S,3)`` in (0, 1), and optionally ``extras (S,E)``.
    """

    def render_inputs(self) -> dict[str, torch.Tensor]: ...


def inverse_sigmoid(p: float) -> float:
    """``log(p / (1 - p))`` for an initial opacity ``p`` in (0, 1)."""
    return math.log(p / (1.0 - p))


def frame_bone_transforms(
    smpl: SMPLModel,
    rest_joints: np.ndarray,
    canonical_G: np.ndarray,
    poses: np.ndarray,
    world_from_body: np.ndarray,
) -> np.ndarray:
    """World-from-canonical bone transforms for one frame (3DGS-Avatar convention).

    Args:
        smpl: the body model (joint tree).
        rest_joints: (24, 3) float64 shaped rest-pose joints (metres, body frame).
        canonical_G: (24, 4, 4) float64 relative bone transforms of the canonical pose.
        poses: (72,) SMPL axis-angle (radians) of the frame, root included (zero for ZJU).
        world_from_body: (4, 4) float64 rigid transform body -> world (ZJU ``Rh``, ``Th``).

    Returns:
        (24, 4, 4) float64 ``B_b = world_from_body @ G_pose_b @ inv(G_canonical_b)``,
        mapping canonical-space points to world space (metres).
    """
    return bone_transforms(np.asarray(poses, np.float64).reshape(24, 3), world_from_body, rest_joints,
                           smpl.parents, np.linalg.inv(canonical_G))[1]


def bone_transforms_torch(
    theta: torch.Tensor,
    rest_joints: np.ndarray,
    canonical_G: np.ndarray,
    world_from_body,
    parents=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable :func:`frame_bone_transforms`: local rotations and world-from-canonical
    bone transforms from a pose tensor (gradients reach ``theta`` and ``world_from_body``).

    ``R_b = exp([theta_b]_x)``, ``G_pose =`` forward kinematics of ``R`` on the rest joints,
    ``B_b = world_from_body @ G_pose_b @ inv(G_canonical_b)`` (3DGS-Avatar convention).

    Args:
        theta: ``(72,)`` SMPL axis-angle, radians (tensor; its dtype and device are used).
        rest_joints: ``(24, 3)`` float64 shaped rest-pose joints, metres (body frame).
        canonical_G: ``(24, 4, 4)`` float64 relative bone transforms of the canonical pose.
        world_from_body: ``(4, 4)`` rigid body -> world transform (array or tensor).
        parents: kinematic tree (default SMPL's).

    Returns:
        ``(rot (24, 3, 3), B (24, 4, 4))`` in ``theta``'s dtype.
    """
    from fmgs.body_model import NUM_JOINTS
    from fmgs.trainer.models.fields import SMPL_PARENTS, so3_exp
    from fmgs.trainer.models.smpl_torch import forward_kinematics_torch

    dtype, dev = theta.dtype, theta.device
    rot = so3_exp(theta.reshape(NUM_JOINTS, 3))
    J = torch.as_tensor(np.asarray(rest_joints, np.float64), dtype=dtype, device=dev)
    G_pose = forward_kinematics_torch(rot, J, SMPL_PARENTS if parents is None else parents)
    G_inv = torch.as_tensor(np.linalg.inv(np.asarray(canonical_G, np.float64)), dtype=dtype, device=dev)
    if torch.is_tensor(world_from_body):
        W = world_from_body.to(dtype=dtype, device=dev)
    else:
        W = torch.as_tensor(np.asarray(world_from_body, np.float64), dtype=dtype, device=dev)
    return rot, W[None] @ G_pose @ G_inv


class AvatarModel(nn.Module):
    """Base class of the avatars.

    Subclasses set :attr:`kind` and implement :meth:`from_config`, :meth:`pose` and, when
    they train, :meth:`param_groups` and :meth:`loss_groups`.

    Attributes:
        kind: the ``model.kind`` it implements (also the bundle's ``kind``).
        needs_priors: training reads the per-frame priors (``docs/priors.md``).
    """

    kind: ClassVar[str] = ""
    needs_priors: ClassVar[bool] = False

    def _apply(self, fn, *args, **kwargs):
        # Precomputed hash-grid lookups (plain attributes: a dataclass of tensors, not buffers,
        # and not saved) follow every move of the parameters, so ``model.to(device)`` moves
        # everything the forward pass reads.
        out = super()._apply(fn, *args, **kwargs)
        for name, value in list(vars(self).items()):
            if isinstance(value, HashLookup):
                setattr(self, name, value.apply(fn))
        return out

    @contextlib.contextmanager
    def frozen(self):
        """Context manager for work that poses a trained avatar many times without changing it
        (test-time pose refinement, held-out rendering).

        Inside it every parameter that required a gradient is frozen (``requires_grad=False``;
        gradients still reach the pose, which is not a parameter), and the pose-independent
        quantities a subclass routes through :meth:`_pose_independent` (hash-grid features at
        the fixed canonical centres, canonical-query skinning weights) are computed on the first
        forward and reused until the outermost ``frozen()`` exits. Both depend on the parameters
        only, so the outputs are bit-for-bit those of the uncached forward (tests/test_refine.py).
        On exit the frozen parameters require gradients again and the cache is dropped, so a
        later parameter change is always seen. Nested calls share the outer one's cache.
        Do not change the parameters inside it (they are frozen for that reason).
        """
        if self.__dict__.get("_frozen_cache") is not None:      # nested: the outer one owns it
            yield self
            return
        params = [p for p in self.parameters() if p.requires_grad]
        for p in params:
            p.requires_grad_(False)
        self.__dict__["_frozen_cache"] = {}
        try:
            yield self
        finally:
            self.__dict__["_frozen_cache"] = None
            for p in params:
                p.requires_grad_(True)

    def _pose_independent(self, key, compute):
        """``compute()``, or inside :meth:`frozen` its value cached under ``key`` (a value that
        depends on the parameters only, never on the pose, the camera or a random draw)."""
        cache = self.__dict__.get("_frozen_cache")
        if cache is None:
            return compute()
        if key not in cache:
            cache[key] = compute()
        return cache[key]

    @classmethod
    def from_config(cls, cfg, setup: AvatarSetup, num_frames: int = 0) -> "AvatarModel":
        """Build the model from a run config (:class:`fmgs.config.Config`) for a subject.

        Args:
            cfg: the run config.
            setup: the subject's body model and canonical surfels.
            num_frames: training frames (models with per-frame parameters size them by it).
        """
        raise NotImplementedError

    @property
    def num_surfels(self) -> int:
        """Number of surfels S."""
        return int(self.centers.shape[0])

    @property
    def semantic_classes(self) -> int:
        """Classes of the rendered semantic logits (``extras``), 0 when the model has none."""
        return 0

    def param_groups(self, lr) -> list[dict]:
        """Adam parameter groups (each a dict with ``params``, ``lr``, ``name``).

        Args:
            lr: the ``train.lr`` config section (learning rates by group name).
        """
        return []

    def pose(self, frame, setup: AvatarSetup, *, frame_id: int | None = None, training: bool = False,
             semantic: bool = True) -> Posed:
        """World-space surfels for ``frame`` (a :class:`fmgs.trainer.data.humannerf.Frame`).

        Args:
            frame: the frame (SMPL ``poses (72,)``, ``world_from_body (4,4)``, ``camera``).
            setup: the subject (:class:`AvatarSetup`).
            frame_id: index of ``frame`` in the training split (per-frame parameters), None
                for held-out frames.
            training: training-time behaviour (e.g. pose noise).
            semantic: also evaluate semantic outputs when the model has them.
        """
        raise NotImplementedError

    def pose_at(self, frame, setup: AvatarSetup, theta: torch.Tensor, world_from_body: torch.Tensor) -> Posed:
        """Differentiable posing at an explicit SMPL pose (test-time pose refinement,
        :mod:`fmgs.trainer.engine.refine`): like :meth:`pose` for a held-out frame, but the
        pose comes from ``theta`` and ``world_from_body`` so gradients reach them.

        Args:
            frame: the frame (its camera).
            setup: the subject.
            theta: ``(72,)`` float32 SMPL axis-angle, radians.
            world_from_body: ``(4, 4)`` float32 body -> world transform (metres).
        """
        raise NotImplementedError(f"{type(self).__name__} cannot be posed differentiably")

    def render(self, posed: Posed, camera, cfg) -> RenderOutput:
        """Rasterise ``posed`` at ``camera`` (:func:`fmgs.trainer.render.dispatch.render_posed`)
        with the run config's background, back-end and fragment cap.

        Args:
            posed: output of :meth:`pose`.
            camera: :class:`fmgs.camera.Camera`.
            cfg: the run config.
        """
        return render_posed(posed, camera, background=np.asarray(cfg.data.background, np.float32),
                            backend=cfg.train.backend, max_fragments=cfg.train.max_fragments,
                            extras_weights_only=semantic_weights_only(cfg))

    def loss_groups(self, cfg, out: RenderOutput, posed: Posed, frame, prior: dict | None, iteration: int,
                    generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """The training losses by group name (summed into the total; each group's gradient
        reaches what :meth:`backward` lets it reach).

        Args:
            cfg: the run config.
            out: the render of ``posed``.
            posed: output of :meth:`pose`.
            frame: the training frame (``image (H,W,3)``, ``mask (H,W)``).
            prior: the frame's priors (``docs/priors.md``) or None.
            iteration: 0-based training iteration.
            generator: RNG for stochastic terms.
        """
        raise NotImplementedError(f"{type(self).__name__} is not trained")

    def backward(self, posed: Posed, groups: dict[str, torch.Tensor], cfg) -> None:
        """Back-propagate the loss groups (default: their sum)."""
        sum(groups.values()).backward()

    def warm_start_appearance(self, colors: np.ndarray, iters: int, lr_grid: float = 1e-2, lr_mlp: float = 5e-3,
                              seed: int = 0, weights: np.ndarray | None = None) -> dict | None:
        """Fit the appearance to per-surfel colours ``(S, 3)`` in [0, 1] (the ``init.kind=aggregate``
        warm start); returns statistics, or None when the model has no such fit (the default)."""
        return None

    def bundle_info(self) -> dict[str, Any]:
        """What a bundle's manifest records about this avatar (``avatar`` entry): switches and
        sizes a reader may want to know (JSON-serialisable)."""
        return {}

    def describe(self) -> dict[str, Any]:
        """The model's identity saved with its weights (``kind``, constructor sizes), so
        evaluation and export rebuild it without guessing from tensors."""
        return {"kind": self.kind}
