"""Side-by-side renders of two trained runs on the same held-out frames: ``before | after | GT``.

    python benchmarks/side_by_side.py RUN_BEFORE RUN_AFTER --out docs/media/x.png \
        [--split test] [--frames 0 25 50] [--crop]

One row per frame; with ``--crop`` each row is cut to the union of the mask's and both
renders' alpha bounding boxes (plus a margin), so loose garments are visible at full size.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    import imageio.v3 as iio
    import torch

    from fmgs.atomic import atomic_path
    from fmgs.trainer.engine.run import load_run, render_frame

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--split", default="test", choices=("test", "val", "train"))
    ap.add_argument("--frames", type=int, nargs="+", default=[0])
    ap.add_argument("--crop", action="store_true")
    args = ap.parse_args(argv)
    runs = [load_run(args.before, split=args.split), load_run(args.after, split=args.split)]
    rows = []
    with torch.no_grad():
        for i in args.frames:
            fr = runs[0].seq[i]
            outs = [render_frame(r.model, r.setup, r.seq[i], r.cfg) for r in runs]
            panels = [o.rgb.clamp(0, 1).numpy() for o in outs] + [fr.image]
            if args.crop:
                fg = (fr.mask > 0.5) | (outs[0].alpha.numpy() > 0.5) | (outs[1].alpha.numpy() > 0.5)
                ys, xs = np.nonzero(fg)
                m = 8
                y0, y1 = max(ys.min() - m, 0), min(ys.max() + m + 1, fg.shape[0])
                x0, x1 = max(xs.min() - m, 0), min(xs.max() + m + 1, fg.shape[1])
                panels = [p[y0:y1, x0:x1] for p in panels]
            rows.append(np.concatenate(panels, axis=1))
    w = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, w - r.shape[1]), (0, 0))) for r in rows]
    img = (np.clip(np.concatenate(rows, axis=0), 0, 1) * 255 + 0.5).astype(np.uint8)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out) as tmp:
        iio.imwrite(tmp, img, extension=".png")
    print(f"wrote {args.out} ({img.shape[1]}x{img.shape[0]}): before | after | GT, {args.split} frames {args.frames}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
