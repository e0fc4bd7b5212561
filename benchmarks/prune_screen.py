"""Screen the end-of-training opacity pruning threshold on the validation split.

    python benchmarks/prune_screen.py RUN_DIR 0.005 0.01 0.02 0.05 [--split val]

Loads a trained run (its last checkpoint), prints the opacity quantiles and how many surfels
fall under each threshold, then renders the run's ``--split`` frames (``val`` needs a run
trained with ``data.val_fraction > 0``) with the surfels whose opacity is below each threshold
removed (the same :func:`fmgs.trainer.models.densify.prune_candidates` /
:func:`~fmgs.trainer.models.densify.densify_model` path that
``model.densify.final_prune_opacity`` runs after the last iteration) and prints the mean PSNR
(whole image, :func:`fmgs.trainer.engine.run.quick_eval` over every frame) per threshold, ``t=0`` being the run
as trained. Used to choose ``model.densify.final_prune_opacity`` (docs/benchmarks.md,
"End-of-training pruning"). A run trained with pruning already on has lost those surfels;
screen runs trained with ``model.densify.final_prune_opacity=0``.
"""
from __future__ import annotations

import argparse
import copy
import sys

import numpy as np
import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("thresholds", nargs="+", type=float, help="opacity thresholds in (0, 1)")
    ap.add_argument("--split", default="val", choices=("val", "test", "train"))
    args = ap.parse_args(argv)

    from fmgs.trainer.engine.run import load_run, quick_eval
    from fmgs.trainer.models.densify import densify_model, prune_candidates

    run = load_run(args.run_dir, (), split=args.split)
    if len(run.seq) == 0:
        print(f"error: {args.run_dir} has no {args.split} frames "
              "(train with data.val_fraction=0.1 for a validation split)", file=sys.stderr)
        return 2
    op = torch.sigmoid(run.model.opacity_logit).detach().numpy()
    print("surfels", op.size, "opacity quantiles 10/25/50/75%:",
          np.quantile(op, [0.1, 0.25, 0.5, 0.75]).round(4),
          {t: int((op < t).sum()) for t in args.thresholds})

    def mean_psnr(model) -> float:
        return quick_eval(model, run.setup, run.seq, run.cfg, len(run.seq))["psnr"]

    print(f"t=0 surfels {run.model.num_surfels} PSNR {mean_psnr(run.model):.3f}", flush=True)
    for t in args.thresholds:
        model = copy.deepcopy(run.model)
        remove = prune_candidates(model, t)
        if len(remove) >= model.num_surfels:
            print(f"t={t}: would remove every surfel; skipped")
            continue
        densify_model(model, [], remove_ids=remove)
        print(f"t={t} surfels {model.num_surfels} PSNR {mean_psnr(model):.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
