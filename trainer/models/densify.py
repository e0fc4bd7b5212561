"""Free canonical offsets and mesh-guided densification of the avatars' surfels (torch side).

* the free offsets' smoothness term is :func:`fmgs.trainer.losses.terms.offset_laplacian_loss`
  (``model.offsets``).
* :class:`DensifyStats`: per-surfel statistics accumulated between densification steps:
  the image-space gradient of the posed centres (3DGS, Kerbl et al. 2023, Sec. 5.2:
  the norm of the view-space positional gradient, here converted to pixels) and the
  uncovered silhouette around each surfel's projection.
* :func:`select_faces`: which faces to split (``model.densify``).
* :func:`densify_model`: split them (:func:`fmgs.densify.subdivide_faces`), carry the
  per-surfel parameters and the Adam moments to the children, and record the step so
  checkpoints can replay it (:func:`replay_on_model`).

A model that densifies implements ``resize_surfels(surfels, source)`` (replace its
geometry buffers by those of ``surfels`` and gather its per-surfel parameters by
``source``), ``per_surfel_parameters()`` (names) and keeps ``template_surfels`` /
``densify_steps``.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fmgs.densify import subdivide_faces

__all__ = ["DensifyStats", "densify_iterations", "select_faces", "prune_candidates", "densify_model",
           "replay_on_model", "gather_rows"]


def gather_rows(t: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``t[source]`` (rows of the old surfels carried to the new ones)."""
    return t.index_select(0, source.to(t.device))


def densify_iterations(cfg) -> list[int]:
    """Iterations (completed-iteration counts, ascending) after which the run densifies:
    ``round(f * train.iterations)`` for ``f`` in ``model.densify.at``, kept in 1..iterations-1."""
    total = int(cfg.train.iterations)
    its = sorted({int(round(float(f) * total)) for f in cfg.model.densify.at})
    return [i for i in its if 0 < i < total]


class DensifyStats:
    """Per-surfel statistics for :func:`select_faces`, accumulated over training iterations.

    Attributes:
        grad: ``(S,)`` float64 sum over iterations of the image-space gradient norm of the
            posed centre, pixels^-1 x loss (``|P (R dL/dmu)| z / f_x``: the part of the
            world-space gradient parallel to the image plane, in loss per pixel).
        seen: ``(S,)`` float64 iterations in which the surfel received a gradient.
        cover: ``(S,)`` float64 sum of the uncovered mask (``max(mask - alpha, 0)``, max over
            a ``(2r+1)^2`` window) at the surfel's projection.
        projected: ``(S,)`` float64 iterations in which the surfel projected into the image.
    """

    def __init__(self, num_surfels: int):
        self.reset(num_surfels)

    def reset(self, num_surfels: int) -> None:
        """Zero the statistics for ``num_surfels`` surfels (float64, on the host whatever the
        model's device: the hooks and :meth:`add_coverage` copy what they read to the CPU)."""
        z = lambda: torch.zeros(int(num_surfels), dtype=torch.float64)  # noqa: E731
        self.grad, self.seen, self.cover, self.projected = z(), z(), z(), z()

    def state_dict(self) -> dict:
        """The four tensors (saved in checkpoints so a resumed run selects the same faces)."""
        return {"grad": self.grad, "seen": self.seen, "cover": self.cover, "projected": self.projected}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""
        for k in ("grad", "seen", "cover", "projected"):
            setattr(self, k, state[k].to(torch.float64).clone())

    def hook_means(self, means: torch.Tensor, camera) -> None:
        """Register a gradient hook on the posed centres ``means (S, 3)`` (world, metres) of
        one iteration; every gradient computed for them (each loss group of a coordinated
        backward included) is accumulated in image-space units for ``camera``
        (:class:`fmgs.camera.Camera`). A no-op for tensors without gradient."""
        if not means.requires_grad:
            return
        R = torch.as_tensor(camera.R, dtype=torch.float64)
        t = torch.as_tensor(camera.t, dtype=torch.float64)
        fx = float(camera.K[0, 0])
        z = (means.detach().to("cpu", torch.float64) @ R.T + t)[:, 2].clamp_min(1e-6)
        state = {"sum": None}

        def hook(g):
            g = g.detach().to("cpu", torch.float64)   # statistics live on the host
            state["sum"] = g if state["sum"] is None else state["sum"] + g
            return None

        means.register_hook(hook)
        self._pending = (state, R, z, fx)

    def finish_iteration(self) -> None:
        """Fold the gradient accumulated by :meth:`hook_means` in this iteration into the sums."""
        pending = getattr(self, "_pending", None)
        self._pending = None
        if pending is None or pending[0]["sum"] is None:
            return
        state, R, z, fx = pending
        gc = state["sum"] @ R.T
        mag = gc[:, :2].norm(dim=1) * z / fx
        self.grad += mag
        self.seen += (mag > 0).to(torch.float64)

    @torch.no_grad()
    def add_coverage(self, means: torch.Tensor, alpha: torch.Tensor, mask: torch.Tensor, camera,
                     radius: int) -> None:
        """Accumulate the uncovered mask around each surfel's projection.

        Args:
            means: ``(S, 3)`` posed centres, world metres.
            alpha: ``(H, W)`` rendered opacity.
            mask: ``(H, W)`` foreground mask in [0, 1].
            camera: the frame's camera (pinhole ``K``, ``R``, ``t``).
            radius: window half-width in pixels.
        """
        under = (mask.to("cpu", torch.float32) - alpha.detach().to("cpu", torch.float32)).clamp_min(0)
        if radius > 0:
            under = F.max_pool2d(under[None, None], 2 * radius + 1, stride=1, padding=radius)[0, 0]
        H, W = under.shape
        R = torch.as_tensor(camera.R, dtype=torch.float64)
        t = torch.as_tensor(camera.t, dtype=torch.float64)
        K = torch.as_tensor(camera.K, dtype=torch.float64)
        xc = means.detach().to("cpu", torch.float64) @ R.T + t
        z = xc[:, 2]
        u = (K[0, 0] * xc[:, 0] / z.clamp_min(1e-6) + K[0, 2]).round().long()
        v = (K[1, 1] * xc[:, 1] / z.clamp_min(1e-6) + K[1, 2]).round().long()
        ok = (z > 1e-6) & (u >= 0) & (u < W) & (v >= 0) & (v < H)
        val = torch.zeros(means.shape[0], dtype=torch.float64)
        val[ok] = under[v[ok], u[ok]].to(torch.float64)
        self.cover += val
        self.projected += ok.to(torch.float64)

    def scores(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean image-space gradient, mean uncovered mask)`` per surfel, ``(S,)`` each."""
        return self.grad / self.seen.clamp_min(1), self.cover / self.projected.clamp_min(1)


def select_faces(stats: DensifyStats, num_surfels: int, fraction: float, coverage_share: float,
                 max_surfels: int) -> np.ndarray:
    """Faces (= surfels) to split in one densification step.

    The budget ``k = min(floor(fraction * S), floor((max_surfels - S) / 3))`` (each split
    adds 3 surfels) goes ``round(coverage_share * k)`` to the surfels with the largest mean
    uncovered mask (those with any) and the rest to the largest mean image-space gradient
    (those with any), without repeats; ties by surfel index.

    Returns:
        ``(k',)`` int64 sorted surfel ids, ``k' <= k``.
    """
    S = int(num_surfels)
    k = min(int(np.floor(float(fraction) * S)), max((int(max_surfels) - S) // 3, 0))
    if k <= 0:
        return np.zeros(0, np.int64)
    g, c = (x.numpy() for x in stats.scores())
    k_cov = int(round(float(coverage_share) * k))
    chosen = np.zeros(S, bool)
    order_c = np.lexsort((np.arange(S), -c))
    order_c = order_c[c[order_c] > 0][:k_cov]
    chosen[order_c] = True
    order_g = np.lexsort((np.arange(S), -g))
    order_g = order_g[(g[order_g] > 0) & ~chosen[order_g]][: k - int(chosen.sum())]
    chosen[order_g] = True
    return np.nonzero(chosen)[0].astype(np.int64)


def prune_candidates(model, threshold: float, exclude=()) -> np.ndarray:
    """Surfels whose opacity ``sigmoid(opacity_logit)`` is below ``threshold`` (none when
    ``threshold <= 0``), minus ``exclude``: int64 ids, sorted."""
    if threshold <= 0:
        return np.zeros(0, np.int64)
    with torch.no_grad():
        low = np.nonzero((torch.sigmoid(model.opacity_logit) < float(threshold)).cpu().numpy())[0]
    return np.setdiff1d(low, np.asarray(exclude, np.int64)).astype(np.int64)


def densify_model(model, face_ids, optimizer: torch.optim.Optimizer | None = None, remove_ids=()) -> torch.Tensor:
    """Split the surfels ``face_ids`` of ``model`` (:func:`fmgs.densify.subdivide_faces`) and
    drop those of ``remove_ids`` (pruning: pays for the new surfels in the runtime).

    The children inherit the parent's per-surfel parameters (opacity, scale delta, normal
    displacement, offset: copied, so each child sits on the parent's displaced plane) and
    the parent's Adam moments and step (new parameter tensors, swapped into the
    optimiser's groups); their template geometry and skinning weights come
    from the subdivided mesh. The step is appended to ``model.densify_steps``.

    Args:
        model: an avatar with ``resize_surfels`` (:class:`~fmgs.trainer.models.foundation.SurfelAvatar`,
            :class:`~fmgs.trainer.models.full.FMGSAvatar`).
        face_ids: surfel ids to split.
        optimizer: its optimiser, whose per-surfel state rows are carried (None: no state).
        remove_ids: surfel ids to drop (disjoint from ``face_ids``).

    Returns:
        ``source (S_new,)`` int64: the old surfel of each new surfel.
    """
    ids = np.unique(np.asarray(face_ids, np.int64).reshape(-1))
    rem = np.unique(np.asarray(remove_ids, np.int64).reshape(-1))
    surfels, source = subdivide_faces(model.current_surfels, ids, rem)
    src = torch.as_tensor(source)
    old_n = model.num_surfels
    model.resize_surfels(surfels, src)
    # New Parameter objects (autograd caches a leaf's shape), swapped into the optimiser's
    # groups with their state rows gathered like the values.
    for name in model.per_surfel_parameters():
        old = getattr(model, name, None)
        if old is None:
            continue
        new = torch.nn.Parameter(gather_rows(old.detach(), src).clone(), requires_grad=old.requires_grad)
        setattr(model, name, new)
        if optimizer is None:
            continue
        for group in optimizer.param_groups:
            group["params"] = [new if q is old else q for q in group["params"]]
        st = optimizer.state.pop(old, None)
        if st:
            optimizer.state[new] = {k: gather_rows(v, src) if torch.is_tensor(v) and v.dim() > 0
                                    and v.shape[0] == old_n else v for k, v in st.items()}
    model.densify_steps.append((ids, rem))
    return src


def replay_on_model(model, steps) -> None:
    """Re-apply recorded densification steps (``checkpoint['model_info']['densify']``: per
    step ``{"split": ids, "remove": ids}``) to a freshly built model, before its weights and
    optimiser state are loaded."""
    for step in steps or ():
        if not isinstance(step, dict):          # a bare list of split faces: no pruning
            step = {"split": step, "remove": []}
        densify_model(model, np.asarray(step["split"], np.int64), remove_ids=np.asarray(step["remove"], np.int64))
