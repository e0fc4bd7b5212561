"""One table row per run for the validation protocol (docs/benchmarks.md, "Validation protocol").

    python benchmarks/val_screen.py RUN_DIR [RUN_DIR ...] [--train-frames 10]

For each trained run: the training-frame PSNR (``--train-frames`` evenly spaced frames of the
run's training split, each posed with its own learnt per-frame parameters -- the full
model's pose correction -- as in training, rendered without gradients, no pose noise), the
validation PSNR / SSIM from ``RUN/eval_val/metrics.json`` (``fmgs-eval RUN --split val``) and,
when it exists, the test PSNR / SSIM from ``RUN/eval/metrics.json``. Prints a markdown table.
The training-frame PSNR is the same :func:`fmgs.trainer.engine.metrics.psnr` as the held-out
one (whole image, background included).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch


def train_psnr(run_dir: Path, frames: int) -> float:
    """Mean PSNR on ``frames`` evenly spaced training frames (with per-frame parameters)."""
    from fmgs.trainer.engine.metrics import psnr
    from fmgs.trainer.engine.run import load_run

    run = load_run(run_dir, split="train")
    seq = run.seq
    idx = np.unique(np.linspace(0, len(seq) - 1, frames).round().astype(int))
    vals = []
    with torch.no_grad():
        for i in idx:
            fr = seq[int(i)]
            out = run.model.render(run.model.pose(fr, run.setup, frame_id=int(i)), fr.camera, run.cfg)
            vals.append(psnr(out.rgb.clamp(0, 1).numpy(), fr.image))
    return float(np.mean(vals))


def _metrics(path: Path):
    if not path.is_file():
        return None
    m = json.loads(path.read_text())
    return float(m["psnr"]), float(m["ssim"]), int(m["num_frames"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--train-frames", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    from fmgs.errors import FmgsInputError

    print("| run | train-frame PSNR | val PSNR / SSIM | test PSNR / SSIM |\n| --- | --- | --- | --- |")
    for r in args.runs:
        try:
            tp = train_psnr(r, args.train_frames)
        except FmgsInputError as exc:
            print(f"val_screen: {exc}", file=sys.stderr)
            return 2
        v, t = _metrics(r / "eval_val" / "metrics.json"), _metrics(r / "eval" / "metrics.json")
        vs = f"{v[0]:.2f} / {v[1]:.4f} ({v[2]} fr.)" if v else "-"
        ts = f"{t[0]:.2f} / {t[1]:.4f} ({t[2]} fr.)" if t else "-"
        print(f"| {r.name} | {tp:.2f} | {vs} | {ts} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
