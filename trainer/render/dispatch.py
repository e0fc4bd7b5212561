"""The one rasteriser interface of fmgs-avatar: 2D Gaussian surfels (2DGS) -> images.

:func:`rasterize_surfels` renders planar Gaussian surfels (Huang et al., "2D Gaussian
Splatting for Geometrically Accurate Radiance Fields", SIGGRAPH 2024; the FMGS-Avatar
surfels) with one of two back-ends:

* ``'cpu'``: plain PyTorch fragment lists with an analytic backward
  (:mod:`fmgs.trainer.render.cpu`); exact 2DGS per-pixel ray-splat intersection,
  intersection depth, low-pass filter, 0.99 alpha clamp, 1/255 skip, 1e-4 early stop.
* ``'gsplat'``: ``gsplat.rasterization_2dgs`` on CUDA (:mod:`fmgs.trainer.render.gsplat`),
  with its outputs converted to the conventions below. Known differences: gsplat
  uses the surfel *centre* depth for every fragment, clamps alpha at 0.999, and its
  median depth is 2DGS's (last fragment with transmittance > 0.5 before it).

Conventions (shared by both back-ends):

* Camera: OpenCV axes (x right, y down, z forward); ``viewmat`` maps world to camera;
  ``K`` maps camera points to pixels; pixel (i, j) (row i, column j) has its centre at
  (x, y) = (j + 0.5, i + 0.5) (3DGS / gsplat convention).
* Blending weights w_i = alpha_i prod_{j<i} (1 - alpha_j) over fragments sorted by
  surfel centre depth (front to back, as 2DGS sorts).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import Tensor

from fmgs.trainer.render.cpu import rasterize_cpu
from fmgs.trainer.render.types import RenderOutput

__all__ = ["RenderOutput", "rasterize_surfels", "render_posed", "resolve_backend", "gsplat_available"]

_BACKENDS = ("auto", "cpu", "gsplat")


def gsplat_available() -> bool:
    """True when ``gsplat`` can be imported and CUDA is available (the gsplat back-end's needs)."""
    if not torch.cuda.is_available():
        return False
    try:
        import gsplat  # noqa: F401
    except Exception:
        return False
    return True


def resolve_backend(backend: str, device: torch.device | None = None) -> str:
    """Resolve ``'auto' | 'cpu' | 'gsplat'`` to the back-end that will run.

    ``'auto'`` picks ``'gsplat'`` when the inputs live on a CUDA device and gsplat is
    importable, else ``'cpu'``.

    Raises:
        ValueError: unknown back-end name.
        RuntimeError: ``'gsplat'`` requested without CUDA or without the gsplat package.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"unknown rasteriser backend {backend!r}; expected one of {_BACKENDS}")
    if backend == "cpu":
        return "cpu"
    if backend == "gsplat":
        if not torch.cuda.is_available():
            raise RuntimeError("rasteriser backend 'gsplat' needs a CUDA device, and torch sees "
                               "none; use backend='cpu' (or 'auto')")
        try:
            import gsplat  # noqa: F401
        except Exception as exc:  # ImportError or a broken build
            raise RuntimeError("rasteriser backend 'gsplat' needs the gsplat package "
                               f"(pip install gsplat): {exc}") from exc
        return "gsplat"
    on_cuda = device is not None and torch.device(device).type == "cuda"
    return "gsplat" if on_cuda and gsplat_available() else "cpu"


def _check(name: str, t: Tensor, shape: tuple) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != len(shape) or any(s is not None and a != s for a, s in zip(t.shape, shape)):
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")


def rasterize_surfels(means: Tensor, rotations: Tensor, scales: Tensor, opacities: Tensor,
                      colors: Tensor, K: Tensor, viewmat: Tensor, width: int, height: int,
                      extras: Tensor | None = None, background: Tensor | None = None,
                      near: float = 0.01, backend: str = "auto",
                      max_fragments: int | None = None, extras_weights_only: bool = False) -> RenderOutput:
    """Render 2D Gaussian surfels into one camera (differentiable).

    Each surfel i is the planar Gaussian p_i + u s_u t_u + v s_v t_v with density
    exp(-(u^2 + v^2)/2). A pixel ray hits its plane at local (u, v) (2DGS eq. 9-10);
    with the screen-space low-pass filter rho = min(u^2 + v^2, 2 |pix - proj(p)|^2)
    (pixel units, 2DGS eq. 11) the fragment alpha is ``min(0.99, o exp(-rho/2))``;
    fragments with alpha < 1/255 are skipped, blending stops once the transmittance
    would drop below 1e-4 (2DGS). The fragment depth is the ray-plane intersection
    depth where the 3D term is the smaller one, else the centre depth (2DGS). Rays
    (nearly) parallel to a surfel plane use the 2D filter term.

    Args:
        means: (N, 3) float32/float64, world-space centres (metres).
        rotations: (N, 3, 3) same dtype, world-frame orthonormal columns [t_u, t_v, n].
        scales: (N, 2) same dtype, (s_u, s_v) in metres, > 0.
        opacities: (N,) same dtype, in [0, 1].
        colors: (N, 3) same dtype (any range; composited linearly).
        K: (3, 3) pixel intrinsics, OpenCV, last row (0, 0, 1); pixel (i, j) centre at
            (j + 0.5, i + 0.5).
        viewmat: (4, 4) world->camera extrinsics (OpenCV axes). Not differentiated.
        width, height: image size in pixels.
        extras: optional (N, E) extra per-surfel channels (E <= 32 for the gsplat path),
            composited like colour without background.
        background: optional (3,) colour added as ``(1 - alpha) * background``; default black.
        near: surfels with camera-space centre depth < near are culled (metres).
        backend: ``'auto'`` (gsplat when the inputs are on CUDA and gsplat imports, else
            cpu), ``'cpu'`` or ``'gsplat'``.
        max_fragments: optional cap on the contributing (alpha >= 1/255) fragments per
            pixel (the first ones by depth are kept; cpu back-end only); None = exact.
        extras_weights_only: composite ``extras`` with the blending weights treated as
            constants, so a loss on ``RenderOutput.extras`` has a gradient w.r.t. ``extras``
            only, never w.r.t. the geometry (means, rotations, scales, opacities). The
            values are unchanged. Used for the semantic logits (see
            :mod:`fmgs.trainer.losses.coordinated`). The gsplat back-end renders the extras in a
            second call with detached geometry.

    Returns:
        :class:`RenderOutput`; differentiable w.r.t. means, rotations, scales, opacities,
        colors and extras (piecewise: the fragment selection, clamps and the min() of the
        filter are treated as constants, as in 2DGS).

    Raises:
        ValueError: bad shapes, sizes or back-end name; K not of the form [[.,.,.],[0,.,.],[0,0,1]].
        TypeError: non-tensor inputs.
        RuntimeError: ``backend='gsplat'`` without CUDA / gsplat.
    """
    N = means.shape[0] if isinstance(means, Tensor) else -1
    _check("means", means, (N, 3))
    _check("rotations", rotations, (N, 3, 3))
    _check("scales", scales, (N, 2))
    _check("opacities", opacities, (N,))
    _check("colors", colors, (N, 3))
    _check("K", K, (3, 3))
    _check("viewmat", viewmat, (4, 4))
    if extras is not None:
        _check("extras", extras, (N, None))
    if background is not None:
        _check("background", background, (3,))
    if int(width) <= 0 or int(height) <= 0:
        raise ValueError(f"image size must be positive, got width={width}, height={height}")
    if max_fragments is not None and int(max_fragments) <= 0:
        raise ValueError(f"max_fragments must be positive or None, got {max_fragments}")
    with torch.no_grad():
        last = K[2].detach().cpu().double()
        if not torch.allclose(last, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)) \
                or float(K[1, 0]) != 0.0:
            raise ValueError(f"K must be an upper-triangular pixel intrinsic matrix with "
                             f"last row (0, 0, 1), got {K.tolist()}")
    name = resolve_backend(backend, means.device)
    dt = means.dtype
    K = K.to(dt)
    viewmat = viewmat.to(dt)
    if name == "gsplat":
        from fmgs.trainer.render.gsplat import rasterize_gsplat  # imports gsplat: only when asked for
        out = rasterize_gsplat(means, rotations, scales, opacities, colors, K, viewmat,
                               int(width), int(height), extras=None if extras_weights_only else extras,
                               background=background, near=near)
        if extras_weights_only and extras is not None:
            ext = rasterize_gsplat(means.detach(), rotations.detach(), scales.detach(), opacities.detach(),
                                   colors.detach(), K, viewmat, int(width), int(height), extras=extras,
                                   near=near).extras
            out = dataclasses.replace(out, extras=ext)
        return out
    return rasterize_cpu(means, rotations, scales, opacities, colors, K, viewmat, int(width),
                         int(height), extras=extras, background=background, near=near,
                         max_fragments=max_fragments, extras_weights_only=extras_weights_only)


def render_posed(posed, camera, background=None, backend: str = "auto", max_fragments: int | None = None,
                 extras_weights_only: bool = False) -> RenderOutput:
    """Render posed surfels (anything with ``render_inputs()``, e.g. an avatar's
    :meth:`~fmgs.trainer.models.base.AvatarModel.pose` output) at a camera.

    The tensors handed to the rasteriser are exactly ``posed.render_inputs()`` (the same
    objects), so that dict can also be given to
    :func:`fmgs.trainer.losses.coordinated.coordinated_backward`.

    Args:
        posed: ``render_inputs()`` -> ``means (S,3)``, ``rotations (S,3,3)``, ``scales (S,2)``,
            ``opacities (S,)``, ``colors (S,3)`` and optionally ``extras (S,E)`` (world space, metres).
        camera: :class:`fmgs.camera.Camera` (``K`` pixels, ``viewmat`` world->camera, ``width``, ``height``).
        background: optional ``(3,)`` colour in [0, 1]; default black.
        backend, max_fragments: as :func:`rasterize_surfels`.
        extras_weights_only: composite ``extras`` with the blending weights held constant, so a
            loss on them reaches the extras only, never the geometry.

    Returns:
        :class:`RenderOutput` at the camera's resolution, on the surfels' device.
    """
    x = posed.render_inputs()
    dt, dev = x["means"].dtype, x["means"].device
    bg = None if background is None else torch.as_tensor(np.asarray(background, np.float64), dtype=dt, device=dev)
    return rasterize_surfels(
        x["means"], x["rotations"], x["scales"], x["opacities"], x["colors"],
        torch.as_tensor(np.asarray(camera.K), dtype=dt, device=dev),
        torch.as_tensor(np.asarray(camera.viewmat), dtype=dt, device=dev),
        int(camera.width), int(camera.height), extras=x.get("extras"), background=bg, backend=backend,
        max_fragments=max_fragments, extras_weights_only=extras_weights_only,
    )
