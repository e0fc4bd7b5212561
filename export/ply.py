"""The canonical avatar as a standard 3D Gaussian Splatting ``.ply`` (viewer interchange).

Layout (one ``vertex`` element, binary little-endian float32 properties, the order of
INRIA's 3DGS ``GaussianModel.save_ply``)::

    x y z                 centre, metres, canonical body frame
    nx ny nz              surfel normal n (3DGS writes zeros; 2DGS too; viewers ignore it)
    f_dc_0 f_dc_1 f_dc_2  degree-0 SH coefficient: (rgb - 0.5) / C0, C0 = 0.28209479177387814
    f_rest_0 .. f_rest_44 higher SH bands, all zero (with ``sh_rest=True``: INRIA 3DGS and 2DGS
                          loaders assert 45 of them; the colour is view-independent here)
    opacity               logit(opacity) (viewers apply a sigmoid)
    scale_0 scale_1 scale_2  log std-devs: log s_u, log s_v, log THIN_SCALE
    rot_0 .. rot_3        unit quaternion (w, x, y, z) of the rotation with columns
                          [t_u, t_v, n] (3DGS ``build_rotation`` convention)

2D surfels have two scales. 2DGS's own ``save_ply`` writes only ``scale_0, scale_1`` and its
``load_ply`` keeps the first two of however many it finds, while 3DGS viewers (SuperSplat,
antimatter15/splat, gsplat's viewer) need three; so the third scale is the log of a thin
:data:`THIN_SCALE` (10 micrometres, >= 100x thinner than the surfels), which both families
read: 3DGS viewers draw near-flat disks, 2DGS drops it.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

#: Degree-0 real SH constant (3DGS ``RGB2SH``).
SH_C0 = 0.28209479177387814
#: Third (normal-axis) std-dev written for 3DGS viewers, metres.
THIN_SCALE = 1e-5


def rotation_to_quaternion(R: np.ndarray) -> np.ndarray:
    """Rotation matrices -> unit quaternions ``(w, x, y, z)`` with ``w >= 0``.

    SciPy's ``Rotation.from_matrix`` (float64), reordered to 3DGS's scalar-first layout.

    Args:
        R: ``(N, 3, 3)`` proper rotations (``x' = R x``).

    Returns:
        ``(N, 4)`` float64 quaternions; ``R == build_rotation(q)`` of 3DGS.
    """
    from scipy.spatial.transform import Rotation

    xyzw = Rotation.from_matrix(np.asarray(R, np.float64)).as_quat()     # SciPy: scalar last
    q = np.concatenate([xyzw[:, 3:], xyzw[:, :3]], axis=1)
    q *= np.where(q[:, :1] < 0, -1.0, 1.0)
    return q


def ply_properties(sh_rest: bool = True) -> list[str]:
    """The vertex property names, in file order."""
    names = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
    if sh_rest:
        names += [f"f_rest_{i}" for i in range(45)]
    return names + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]


def write_gaussian_ply(path: str | os.PathLike, centers, rotations, scales, opacities, colors,
                       sh_rest: bool = True) -> Path:
    """Write surfels as a 3DGS ``.ply`` (layout in the module docstring).

    Args:
        path: output file (written as given; callers wanting atomicity write to a
            temporary name, e.g. via :func:`fmgs.atomic.atomic_path`).
        centers: ``(S, 3)`` metres.
        rotations: ``(S, 3, 3)`` columns ``[t_u, t_v, n]``.
        scales: ``(S, 2)`` std-devs ``(s_u, s_v)``, metres, > 0.
        opacities: ``(S,)`` in (0, 1) (clipped to [1e-6, 1 - 1e-6] before the logit).
        colors: ``(S, 3)`` RGB in [0, 1].
        sh_rest: write the 45 zero ``f_rest_*`` properties (loadable by INRIA 3DGS / 2DGS).

    Returns:
        ``Path(path)``.
    """
    c = np.asarray(centers, np.float64)
    R = np.asarray(rotations, np.float64)
    S = c.shape[0]
    sc = np.asarray(scales, np.float64)
    op = np.clip(np.asarray(opacities, np.float64).reshape(S), 1e-6, 1 - 1e-6)
    col = np.asarray(colors, np.float64).reshape(S, 3)
    cols = [c, R[:, :, 2], (col - 0.5) / SH_C0]
    if sh_rest:
        cols.append(np.zeros((S, 45)))
    cols += [np.log(op / (1 - op))[:, None], np.log(sc), np.full((S, 1), np.log(THIN_SCALE)),
             rotation_to_quaternion(R)]
    data = np.ascontiguousarray(np.concatenate(cols, 1).astype("<f4"))
    names = ply_properties(sh_rest)
    assert data.shape[1] == len(names)
    header = ["ply", "format binary_little_endian 1.0", "comment fmgs-avatar canonical avatar (3DGS layout)",
              f"element vertex {S}", *[f"property float {n}" for n in names], "end_header"]
    path = Path(path)
    with open(path, "wb") as f:
        f.write(("\n".join(header) + "\n").encode("ascii"))
        f.write(data.tobytes())
    return path
