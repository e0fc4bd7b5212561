"""Seconds per training iteration of the foundation avatar on real ZJU-MoCap 377.

Times the stages of one iteration (model forward incl. LBS, rasterisation,
losses, backward, optimiser step) at the given resolutions with the ~55k-surfel
avatar, after warm-up, and prints a markdown table for docs/benchmarks.md.

    python benchmarks/bench_train.py --res 256 512 --iters 10 [--threads 2]
    python benchmarks/bench_train.py --res 512 model.kind=full data.priors_dir=runs/priors377

The full model (``model.kind=full``) is timed with the training loop's own loss groups
(priors from ``data.priors_dir`` when given) and coordinated backward.
"""
from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--res", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--iters", type=int, default=10)  # use a multiple of loss.semantic_every
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from fmgs.config import load_config
    from fmgs.trainer.engine.run import build_model, build_setup, make_optimizer, open_sequence
    from fmgs.trainer.engine.train import semantic_iteration

    rows = []
    for res in args.res:
        cfg = load_config(None, [f"data.image_size={res}", "data.train_range=[0,455]", "data.train_step=15",
                                 *args.overrides])
        seq = open_sequence(cfg, "train")
        setup = build_setup(cfg, seq)
        model = build_model(cfg, setup, num_frames=len(seq))
        opt = make_optimizer(cfg, model)
        priors = [None] * len(seq)
        if model.needs_priors:
            from fmgs.priors import load_priors

            priors = load_priors(cfg.data.root, seq.names, res, cfg.data.priors_dir)
        stages = {k: [] for k in ("model", "raster", "loss", "backward", "step", "total")}
        for it in range(args.warmup + args.iters):
            idx = it % len(seq)
            fr = seq[idx]
            t0 = time.perf_counter()
            posed = model.pose(fr, setup, frame_id=idx, training=True, semantic=semantic_iteration(cfg, it))
            t1 = time.perf_counter()
            out = model.render(posed, fr.camera, cfg)
            t2 = time.perf_counter()
            groups = model.loss_groups(cfg, out, posed, fr, priors[idx], it)
            t3 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            model.backward(posed, groups, cfg)
            t4 = time.perf_counter()
            opt.step()
            t5 = time.perf_counter()
            if it >= args.warmup:
                for k, v in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t5 - t0)):
                    stages[k].append(v)
        med = {k: float(np.median(v)) for k, v in stages.items()}
        med["mean_total"] = float(np.mean(stages["total"]))   # with loss.semantic_every > 1 the mean is the cost
        rows.append((res, model.num_surfels, med))

    print(f"\nmachine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; median (stages, s/iteration) and mean of {args.iters} iterations "
          f"after {args.warmup} warm-up\n")
    print(f"model: {model.kind}")
    print("| resolution | surfels | model+LBS | rasterise | losses | backward | Adam | **s / iteration** | mean |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for res, n, s in rows:
        print(f"| {res}x{res} | {n} | {s['model']:.3f} | {s['raster']:.3f} | {s['loss']:.3f} | "
              f"{s['backward']:.3f} | {s['step']:.3f} | **{s['total']:.3f}** | {s['mean_total']:.3f} |")


if __name__ == "__main__":
    main()
