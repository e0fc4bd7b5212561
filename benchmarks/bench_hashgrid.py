"""Benchmark the pure-PyTorch hash encoding on ~55k fixed surfel centres.

Times (median of ``--repeats``): precompute, on-the-fly forward, precomputed forward,
and forward+backward for both paths (backward of ``out.square().sum()`` w.r.t. the
table; the precomputed path's first backward also builds its cached sparse
transpose, timed separately). Prints a table and, with ``--json``, writes the
numbers with the torch version, thread count and device.

Usage: ``python benchmarks/bench_hashgrid.py [--n 55104] [--repeats 10] [--device cpu]``
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from fmgs.trainer.models.hashgrid import HashGrid, HashGridConfig


def _timed(fn, repeats, device):
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=55104, help="number of points (55,104 = surfels of one subdivided SMPL)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--log2-hashmap-size", type=int, default=16)
    ap.add_argument("--json", default=None, help="write results to this JSON file")
    args = ap.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = HashGridConfig(log2_hashmap_size=args.log2_hashmap_size)
    grid = HashGrid(cfg, device=device)
    x = torch.rand(args.n, 3, device=device)

    def fwd_bwd(**kw):
        grid.table.grad = None
        grid(**kw).square().sum().backward()

    res = {}
    t0 = time.perf_counter()
    lookup = grid.precompute(x)
    res["precompute_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    lookup.transposed_csr(grid.table.dtype)
    res["build_sparse_transpose_s"] = time.perf_counter() - t0
    for _ in range(2):  # warm-up
        fwd_bwd(x=x)
        fwd_bwd(lookup=lookup)
    with torch.no_grad():
        res["forward_on_the_fly_s"] = _timed(lambda: grid(x), args.repeats, device)
        res["forward_precomputed_s"] = _timed(lambda: grid(lookup=lookup), args.repeats, device)
    res["fwd_bwd_on_the_fly_s"] = _timed(lambda: fwd_bwd(x=x), args.repeats, device)
    res["fwd_bwd_precomputed_s"] = _timed(lambda: fwd_bwd(lookup=lookup), args.repeats, device)

    meta = {
        "n_points": args.n,
        "config": cfg.tcnn_config,
        "table_rows": grid.table.shape[0],
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }
    print(f"hash grid: {args.n} points, {cfg.n_levels}x{cfg.n_features_per_level}, T=2^{cfg.log2_hashmap_size}, "
          f"{meta['device']}, torch {meta['torch']}, {meta['threads']} threads")
    for k, v in res.items():
        print(f"  {k:28s} {v * 1e3:9.1f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": res}, f, indent=2)


if __name__ == "__main__":
    main()
