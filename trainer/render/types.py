"""Types shared by the rasteriser dispatcher and its back-ends (no back-end imports here)."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class RenderOutput:
    """Images produced by :func:`rasterize_surfels` (all (H, W[, C]), input dtype/device).

    Attributes:
        rgb: (H, W, 3) composited colour with the background added:
            ``sum_i w_i c_i + (1 - alpha) * background``.
        alpha: (H, W) accumulated opacity ``sum_i w_i`` in [0, 1).
        depth: (H, W) expected camera-space depth (metres) ``depth_acc / max(alpha, 1e-6)``.
        depth_acc: (H, W) ``sum_i w_i z_i`` (unnormalised).
        depth_median: (H, W) depth z of the first fragment after which the transmittance
            is below 0.5; 0 where it never drops below 0.5.
        normal: (H, W, 3) ``sum_i w_i n_i`` with n_i the unit camera-space (OpenCV) surfel
            normal flipped to face the camera (n_i . p_i <= 0); not normalised.
        extras: (H, W, E) ``sum_i w_i e_i`` of the extra channels (no background), or None.
    """

    rgb: Tensor
    alpha: Tensor
    depth: Tensor
    depth_acc: Tensor
    depth_median: Tensor
    normal: Tensor
    extras: Tensor | None
