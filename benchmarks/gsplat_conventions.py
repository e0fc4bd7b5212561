"""Check, on the CPU, the gsplat adapter's input conventions against gsplat's own code.

gsplat ships pure-PyTorch reference versions of its 2DGS projection
(``gsplat/cuda/_torch_impl.py``, ``_torch_impl_2dgs.py``). This script takes them out of the
gsplat wheel (without importing the ``gsplat`` package, whose CUDA extension would be
built), feeds them the real posed surfels of one ZJU-MoCap 377 training frame converted
exactly as :func:`fmgs.trainer.render.gsplat.rasterize_gsplat` converts them (rotation
matrices -> wxyz quaternions, scales ``(s_u, s_v, 1)``), and compares with our conventions:

* ``R diag(s_u, s_v, 1)`` rebuilt by gsplat from our quaternions vs ours;
* gsplat's per-surfel depth vs the camera-space centre depth;
* gsplat's projected centres vs ``K p / z``;
* gsplat's camera-facing surfel normals vs ours (:class:`~fmgs.trainer.render.types.RenderOutput`'s
  rule: ``n . p <= 0``), and the world-space rotation that ``rasterization_2dgs`` applies to
  the rendered normals, undone by the adapter.

The rasterisation itself (tiles, blending, median depth) has no CPU version in gsplat; it is
compared on a GPU by ``benchmarks/gpu_check.sh`` (step ``raster_parity``).

Usage::

    python benchmarks/gsplat_conventions.py .gpucheck/wheels/gsplat-1.5.3-py3-none-any.whl [--data DIR]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

_FILES = ("gsplat/cuda/_torch_impl.py", "gsplat/cuda/_torch_impl_2dgs.py")


def load_reference(wheel: Path, into: Path):
    """``(_quat_scale_to_matrix, _fully_fused_projection_2dgs)`` from the wheel's reference files."""
    with zipfile.ZipFile(wheel) as z:
        for name in _FILES:
            dst = into / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(z.read(name))
    for pkg in ("gsplat", "gsplat/cuda"):
        (into / pkg / "__init__.py").write_text("")
    sys.path.insert(0, str(into))
    from gsplat.cuda._torch_impl import _quat_scale_to_matrix
    from gsplat.cuda._torch_impl_2dgs import _fully_fused_projection_2dgs

    return _quat_scale_to_matrix, _fully_fused_projection_2dgs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("wheel", type=Path, help="gsplat-1.5.x-py3-none-any.whl")
    ap.add_argument("--data", type=Path, default=Path("../shared/data"), help="data root (ZJU-MoCap 377, SMPL)")
    args = ap.parse_args(argv)

    from fmgs.config import load_config
    from fmgs.trainer.engine.run import build_model, build_setup, open_sequence
    from fmgs.trainer.render.gsplat import rotmat_to_quat_wxyz

    data = args.data.resolve()
    sm = data / "body_models" / "smpl"
    cfg = load_config(None, [f"data.root={data / 'zju_mocap' / '377'}", f"data.smpl_path={sm / 'SMPL_NEUTRAL.pkl'}",
                             f"data.parts_path={sm / 'smplh_parts_segm.pkl'}", "data.train_range=[0,1]"])
    with tempfile.TemporaryDirectory() as tmp:
        quat_scale_to_matrix, projection_2dgs = load_reference(args.wheel, Path(tmp))
        seq = open_sequence(cfg, "train")
        setup = build_setup(cfg, seq)
        torch.manual_seed(0)
        model = build_model(cfg, setup)
        fr = seq[0]
        with torch.no_grad():
            x = model.pose(fr, setup).render_inputs()
        R, s, mu = x["rotations"].double(), x["scales"].double(), x["means"].double()
        q = rotmat_to_quat_wxyz(R)                                   # the adapter's conversions
        s3 = torch.cat([s, torch.ones_like(s[:, :1])], 1)
        V = torch.as_tensor(np.asarray(fr.camera.viewmat), dtype=torch.float64)
        K = torch.as_tensor(np.asarray(fr.camera.K), dtype=torch.float64)
        radii, means2d, depths, _M, normals = projection_2dgs(mu, q, s3, V[None], K[None], fr.camera.width,
                                                              fr.camera.height)
    pc = mu @ V[:3, :3].T + V[:3, 3]
    uv = (pc @ K.T)[:, :2] / pc[:, 2:3]
    vis = radii[0].amax(-1) > 0
    n_cam = R[:, :, 2] @ V[:3, :3].T
    n_cam = torch.where((n_cam * pc).sum(-1, keepdim=True) <= 0, n_cam, -n_cam)
    n_world = normals[0] @ torch.linalg.inv(V)[:3, :3].T            # what rasterization_2dgs returns
    rows = {
        "R diag(s_u, s_v, 1) from our quaternions, max abs": (quat_scale_to_matrix(q, s3) - R * s3[:, None, :]).abs().max(),
        "per-surfel depth vs camera z, max abs (m)": (depths[0] - pc[:, 2]).abs().max(),
        "projected centre vs K p / z, max abs (px, visible)": (means2d[0][vis] - uv[vis]).abs().max(),
        "camera-facing normal vs ours, max abs": (normals[0] - n_cam).abs().max(),
        "normal length - 1, max abs": (normals[0].norm(dim=-1) - 1).abs().max(),
        "world normals rotated back by the viewmat, max abs": (n_world @ V[:3, :3].T - normals[0]).abs().max(),
    }
    print(f"gsplat reference from {args.wheel.name}: {R.shape[0]} posed surfels of {fr.name}, "
          f"{int(vis.sum())} in view")
    for k, v in rows.items():
        print(f"  {k}: {float(v):.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
