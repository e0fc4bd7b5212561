"""Benchmark of the surfel rasteriser on a ZJU-MoCap-like scene.

Scene: N surfels tangent to a human-sized ellipsoid (semi-axes 0.55 x 1.15 x 0.25 m,
centre 3 m in front of the camera), random in-plane rotation, scales ~5 mm,
opacities U(0.5, 1), focal 540 px at 512^2 (scaled with the resolution), so that
about a quarter of the pixels are covered, like a person in a ZJU-MoCap frame.

Times (median over --iters, after one warm-up) the forward pass and forward+backward
of a loss touching every output (rgb, alpha, depth, median depth, normal, extras);
reports the fragment count, coverage and the peak resident memory of the process
(ru_maxrss, a process-wide high-water mark, so it only grows across rows).

Usage:
    python benchmarks/bench_rasterizer.py --surfels 55000 --res 256 512 --iters 5 --threads 2
"""
from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from fmgs.trainer.render.dispatch import rasterize_surfels


def make_scene(n: int, res: int, extras: int, seed: int = 0, dtype=torch.float32):
    """Surfels on an ellipsoid 3 m in front of an OpenCV camera; returns kwargs for the rasteriser."""
    g = torch.Generator().manual_seed(seed)
    axes = torch.tensor([0.55, 1.15, 0.25], dtype=torch.float64)
    # roughly area-uniform points: normalised Gaussian directions scaled to the ellipsoid
    d = torch.randn(n, 3, generator=g, dtype=torch.float64)
    d = d / d.norm(dim=1, keepdim=True)
    pts = d * axes
    nrm = pts / axes ** 2
    nrm = nrm / nrm.norm(dim=1, keepdim=True)
    a = torch.where(nrm[:, 0:1].abs() < 0.9, torch.tensor([[1.0, 0, 0]], dtype=torch.float64),
                    torch.tensor([[0, 1.0, 0]], dtype=torch.float64))
    tu = torch.linalg.cross(nrm, a)
    tu = tu / tu.norm(dim=1, keepdim=True)
    tv = torch.linalg.cross(nrm, tu)
    phi = 2 * torch.pi * torch.rand(n, 1, generator=g, dtype=torch.float64)
    tu, tv = torch.cos(phi) * tu + torch.sin(phi) * tv, -torch.sin(phi) * tu + torch.cos(phi) * tv
    rot = torch.stack([tu, tv, nrm], dim=-1)
    means = pts + torch.tensor([0.0, 0.0, 3.0], dtype=torch.float64)
    scales = 0.005 * torch.exp(0.3 * torch.randn(n, 2, generator=g, dtype=torch.float64))
    opac = 0.5 + 0.5 * torch.rand(n, generator=g, dtype=torch.float64)
    colors = torch.rand(n, 3, generator=g, dtype=torch.float64)
    f = 540.0 * res / 512
    K = torch.tensor([[f, 0, res / 2], [0, f, res / 2], [0, 0, 1]], dtype=torch.float64)
    ex = torch.randn(n, extras, generator=g, dtype=torch.float64) if extras else None
    c = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return dict(means=c(means), rotations=c(rot), scales=c(scales), opacities=c(opac),
                colors=c(colors), K=c(K), viewmat=torch.eye(4, dtype=dtype), width=res,
                height=res, extras=c(ex))


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def bench(n: int, res: int, iters: int, extras: int, backend: str, max_fragments):
    scene = make_scene(n, res, extras)
    leaves = {k: scene[k].clone().requires_grad_(True)
              for k in ("means", "rotations", "scales", "opacities", "colors", "extras")
              if scene[k] is not None}
    kw = dict(scene, **leaves, backend=backend, max_fragments=max_fragments)

    def fwd():
        with torch.no_grad():
            return rasterize_surfels(**kw)

    def fwd_bwd():
        out = rasterize_surfels(**kw)
        loss = (out.rgb.square().mean() + out.alpha.mean() + out.depth.mean()
                + out.depth_median.mean() + out.normal.square().mean())
        if out.extras is not None:
            loss = loss + out.extras.square().mean()
        loss.backward()
        return out

    fwd_bwd()  # warm-up (first touches of memory are slow on some VMs)
    out = fwd_bwd()
    cover = float((out.alpha > 0.5).float().mean())
    tf, tb = [], []
    for _ in range(iters):
        t0 = time.perf_counter(); fwd(); tf.append(time.perf_counter() - t0)
        t0 = time.perf_counter(); fwd_bwd(); tb.append(time.perf_counter() - t0)
    return statistics.median(tf), statistics.median(tb), cover, _peak_rss_mb()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--surfels", type=int, default=55000)
    ap.add_argument("--res", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--extras", type=int, nargs="+", default=[0],
                    help="extra channel counts to time (e.g. 0 28)")
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--max-fragments", type=int, default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, backend {a.backend}, "
          f"max_fragments {a.max_fragments}\n")
    print("| surfels | res | extras | coverage (alpha>0.5) | fwd s/iter | fwd+bwd s/iter | peak RSS MB |")
    print("|---|---|---|---|---|---|---|")
    for res in a.res:
        for e in a.extras:
            tf, tb, cov, rss = bench(a.surfels, res, a.iters, e, a.backend, a.max_fragments)
            print(f"| {a.surfels} | {res}^2 | {e} | {cov:.1%} | {tf:.3f} | {tb:.3f} | {rss:.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
