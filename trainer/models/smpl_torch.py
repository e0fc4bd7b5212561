"""PyTorch SMPL helpers for training: a safely loaded ``smplx.SMPL`` and batched FK.

The math mirrors :mod:`fmgs.body_model` (NumPy reference) and ``smplx.lbs``
(SMPL, Loper et al. 2015). SMPL pickles are read only through the restricted
:func:`fmgs.pickle_io.load_pickle`, never through smplx's own ``pickle.load``.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from fmgs.body_model import load_smpl

__all__ = ["build_smplx_model", "forward_kinematics_torch"]


def build_smplx_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32, **smpl_kwargs):
    """Build an ``smplx.SMPL`` module from an SMPL pickle without unsafe unpickling.

    The file is loaded and validated by :func:`fmgs.body_model.load_smpl`
    (restricted unpickler, chumpy arrays and sparse ``J_regressor`` converted
    to dense numpy) and handed to smplx as ``data_struct`` with smplx's key
    names (``v_template``, ``f``, ``J_regressor``, ``weights``,
    ``kintree_table``, ``shapedirs``, ``posedirs``).

    Note that smplx casts the arrays through float32 (``smplx.utils.to_np``)
    even when ``dtype=torch.float64``.

    Args:
        path: SMPL model pickle, e.g. ``.../body_models/smpl/SMPL_NEUTRAL.pkl``.
        dtype: torch dtype of the model's buffers and parameters.
        **smpl_kwargs: extra keyword arguments for ``smplx.SMPL`` (e.g.
            ``num_betas``, ``batch_size``).

    Returns:
        ``smplx.SMPL`` module (CPU). Its forward returns vertices (B, 6890, 3)
        and joints (B, 45, 3) in metres; the first 24 joints are SMPL's.

    Raises:
        FmgsInputError: missing / corrupt / malicious / malformed model file.
    """
    import smplx
    from smplx.utils import Struct

    model = load_smpl(path)
    kintree = np.stack([model.parents, np.arange(model.parents.shape[0])]).astype(np.int64)
    arrays = dict(
        v_template=model.v_template,
        f=model.faces,
        J_regressor=model.J_regressor,
        weights=model.weights,
        kintree_table=kintree,
        shapedirs=model.shapedirs,
        posedirs=model.posedirs,
    )
    smpl_kwargs.setdefault("num_betas", model.num_betas)
    return smplx.SMPL(os.fspath(path), data_struct=Struct(**arrays), dtype=dtype, **smpl_kwargs)


def forward_kinematics_torch(
    rot_mats: torch.Tensor, joints: torch.Tensor, parents
) -> torch.Tensor:
    """Batched SMPL forward kinematics (as ``smplx.lbs.batch_rigid_transform``).

    Same definition as :func:`fmgs.body_model.forward_kinematics`: returns the
    relative bone transforms ``G_b = [R^g_b | t_b - R^g_b J_b]`` so that
    ``x_posed = sum_b w_b G_b x_rest``. Posed joints are ``G[..., :3, 3] +
    G[..., :3, :3] @ J`` (or the translation of the un-relativised transform).

    Args:
        rot_mats: (..., 24, 3, 3) local joint rotations.
        joints: (..., 24, 3) rest joints, metres.
        parents: (24,) parent indices (sequence or tensor), ``parents[0] = -1``,
            parents before children.

    Returns:
        (..., 24, 4, 4) relative bone transforms, dtype/device of ``rot_mats``.
    """
    parents = [int(p) for p in (parents.tolist() if hasattr(parents, "tolist") else parents)]
    n = len(parents)
    if rot_mats.shape[-3:] != (n, 3, 3) or joints.shape[-2:] != (n, 3):
        raise ValueError(f"forward_kinematics_torch: shapes {tuple(rot_mats.shape)}, {tuple(joints.shape)}")
    joints = joints.to(rot_mats.dtype)
    rel = joints.clone()
    par = torch.tensor([max(p, 0) for p in parents], device=joints.device)
    rel[..., 1:, :] = joints[..., 1:, :] - joints[..., par[1:], :]
    batch = torch.broadcast_shapes(rot_mats.shape[:-3], joints.shape[:-2])
    rot_r = rot_mats.expand(*batch, n, 3, 3)
    rel_t = rel.expand(*batch, n, 3)
    glob_R: list[torch.Tensor] = []
    glob_t: list[torch.Tensor] = []
    for b, p in enumerate(parents):
        if p < 0:
            glob_R.append(rot_r[..., b, :, :])
            glob_t.append(rel_t[..., b, :])
        else:
            if p >= b:
                raise ValueError(f"parent {p} of joint {b} does not precede it")
            glob_R.append(glob_R[p] @ rot_r[..., b, :, :])
            glob_t.append(glob_t[p] + (glob_R[p] @ rel_t[..., b, :, None])[..., 0])
    R = torch.stack(glob_R, -3)
    t = torch.stack(glob_t, -2)
    t_rel = t - (R @ joints.expand(*batch, n, 3)[..., None])[..., 0]
    top = torch.cat([R, t_rel[..., None]], -1)
    bottom = torch.zeros(*batch, n, 1, 4, dtype=R.dtype, device=R.device)
    bottom[..., 3] = 1.0
    return torch.cat([top, bottom], -2)
