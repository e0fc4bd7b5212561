"""Frame-by-frame comparison of two ``fmgs-eval`` outputs of the same frames (issue 17: "the
full model clearly ahead of the foundation ... (not a tie)").

    python benchmarks/paired_eval.py A_EVAL_DIR B_EVAL_DIR [--block 5] [--resamples 10000]
    python benchmarks/paired_eval.py A_AT_PA B_AT_PA --also A_AT_PB B_AT_PB     # both fitters' poses

Reads both ``metrics.json`` (per-frame records), keeps the frames both scored, and prints,
for PSNR, SSIM and silhouette IoU, the mean of ``B - A``, how many frames B wins, and a 95%
interval of the mean difference from a moving-block bootstrap: the scored frames of a video
are consecutive, and neighbouring frames share their pose error, so frames are resampled in
blocks of ``--block`` consecutive scored frames (Kuensch 1989) rather than one by one, which
would understate the spread. "Clearly ahead" is read as an interval that excludes zero.

``--also``: the symmetric protocol for held-out poses fitted through an avatar
(``fmgs-prep refine --held-out-steps``; docs/benchmarks.md, tenth round: the fitting avatar
wins at its own fitted poses). A and B are scored at the poses fitted through A (the two
positional folders) and at those fitted through B (the two ``--also`` folders); each frame's
difference is the mean of its two ``B - A``, so a fitter's advantage at its own poses cancels
when it is the same for both models. That mean is also the mean of the "each at its own
poses" (``B_AT_PB - A_AT_PA``) and the "crossed" (``B_AT_PA - A_AT_PB``) differences, which
are printed beside it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

KEYS = (("psnr", "PSNR (dB)"), ("ssim", "SSIM"), ("silhouette_iou", "IoU"))


def load_frames(eval_dir: Path) -> dict[str, dict]:
    """``{frame name: per-frame record}`` of ``EVAL_DIR/metrics.json``.

    Raises:
        SystemExit: the file is missing or holds no per-frame records (names the file).
    """
    path = Path(eval_dir) / "metrics.json"
    try:
        recs = json.loads(path.read_text())["frames"]
    except (OSError, ValueError, KeyError) as exc:
        raise SystemExit(f"paired_eval: cannot read per-frame records from {path}: {exc}")
    return {r["frame"]: r for r in recs}


def block_bootstrap_interval(d: np.ndarray, block: int, resamples: int, seed: int = 0) -> tuple[float, float]:
    """95% interval of ``mean(d)`` by the moving-block bootstrap.

    Args:
        d: (n,) float64 paired differences in time order.
        block: consecutive values per block (1 = the ordinary bootstrap); clipped to ``n``.
        resamples: bootstrap resamples.
    Returns:
        ``(low, high)``: the 2.5% and 97.5% quantiles of the resampled means.
    """
    n = d.size
    b = max(1, min(int(block), n))
    starts = np.arange(n - b + 1)
    k = int(np.ceil(n / b))
    rng = np.random.default_rng(seed)
    idx = starts[rng.integers(0, starts.size, (resamples, k))][:, :, None] + np.arange(b)
    means = d[idx.reshape(resamples, -1)[:, :n]].mean(1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    return float(lo), float(hi)


def paired_differences(A: dict[str, dict], B: dict[str, dict], block: int, resamples: int) -> dict[str, dict]:
    """``B - A`` per frame for each metric of :data:`KEYS`, over the frames both scored.

    Args:
        A, B: ``{frame name: per-frame record}`` (:func:`load_frames`); names sort in time order
            (``frame_000400`` ...), which the block bootstrap needs.
        block, resamples: of :func:`block_bootstrap_interval`.
    Returns:
        ``{key: {"a_mean", "b_mean", "mean_difference", "interval": [lo, hi], "wins", "frames"}}``
        (``wins``: frames where B is higher). Empty when no frame is shared.
    """
    names = sorted(set(A) & set(B))
    out = {}
    for key, _label in KEYS if names else ():
        a = np.array([A[n][key] for n in names], np.float64)
        b = np.array([B[n][key] for n in names], np.float64)
        d = b - a
        lo, hi = block_bootstrap_interval(d, block, resamples)
        out[key] = {"a_mean": float(a.mean()), "b_mean": float(b.mean()), "mean_difference": float(d.mean()),
                    "interval": [lo, hi], "wins": int((d > 0).sum()), "frames": int(d.size)}
    return out


def symmetric_records(a_pa: dict[str, dict], b_pa: dict[str, dict], a_pb: dict[str, dict],
                      b_pb: dict[str, dict]) -> tuple[dict[str, dict], dict[str, dict]]:
    """Per-frame records ``(A', B')`` whose ``B' - A'`` is the two-fitter symmetric difference.

    ``A'[n][k] = (A@PA + A@PB) / 2`` and ``B'[n][k] = (B@PA + B@PB) / 2`` for each metric ``k`` of
    :data:`KEYS`, so ``B' - A' = ((B@PA - A@PA) + (B@PB - A@PB)) / 2``: the mean of the
    comparisons at each fitter's poses (PA: poses fitted through avatar A, PB: through B).

    Args:
        a_pa, b_pa, a_pb, b_pb: ``{frame name: per-frame record}`` (:func:`load_frames`) of A and
            B scored at PA and at PB.
    Returns:
        Two ``{frame name: {key: float}}`` over the frames all four scored (empty if none).
    """
    names = set(a_pa) & set(b_pa) & set(a_pb) & set(b_pb)
    A = {n: {k: 0.5 * (float(a_pa[n][k]) + float(a_pb[n][k])) for k, _ in KEYS} for n in names}
    B = {n: {k: 0.5 * (float(b_pa[n][k]) + float(b_pb[n][k])) for k, _ in KEYS} for n in names}
    return A, B


def print_table(title: str, diffs: dict[str, dict]) -> None:
    """Print one markdown table of :func:`paired_differences` under ``title``."""
    print(title)
    print("| metric | A mean | B mean | B - A | 95% interval | B wins |")
    print("| --- | --- | --- | --- | --- | --- |")
    for key, label in KEYS:
        r = diffs[key]
        lo, hi = r["interval"]
        print(f"| {label} | {r['a_mean']:.4f} | {r['b_mean']:.4f} | {r['mean_difference']:+.4f} | "
              f"[{lo:+.4f}, {hi:+.4f}] | {r['wins']} / {r['frames']} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", type=Path, help="reference eval folder (e.g. the foundation's)")
    ap.add_argument("b", type=Path, help="compared eval folder (e.g. the full model's)")
    ap.add_argument("--also", type=Path, nargs=2, metavar=("A_AT_PB", "B_AT_PB"),
                    help="A and B scored at the poses fitted through B (the positional folders: at "
                         "those fitted through A); prints the symmetric two-fitter comparison")
    ap.add_argument("--block", type=int, default=5, help="scored frames per bootstrap block")
    ap.add_argument("--resamples", type=int, default=10000)
    args = ap.parse_args(argv)
    A, B = load_frames(args.a), load_frames(args.b)
    if args.also is None:
        diffs = paired_differences(A, B, args.block, args.resamples)
        if not diffs:
            raise SystemExit(f"paired_eval: {args.a} and {args.b} share no scored frame")
        n = diffs[KEYS[0][0]]["frames"]
        print_table(f"{n} frames in both ({len(A)} in A, {len(B)} in B); B - A, "
                    f"95% moving-block bootstrap ({args.block} frames per block)", diffs)
        return 0
    A2, B2 = load_frames(args.also[0]), load_frames(args.also[1])
    SA, SB = symmetric_records(A, B, A2, B2)
    if not SA:
        raise SystemExit(f"paired_eval: {args.a}, {args.b}, {args.also[0]} and {args.also[1]} "
                         "share no scored frame")
    def sub(recs: dict[str, dict]) -> dict[str, dict]:
        return {n: r for n, r in recs.items() if n in SA}

    tail = f"over the {len(SA)} frames all four scored, 95% moving-block bootstrap ({args.block} frames per block)"
    for title, a, b in (("symmetric: mean of B - A at both fitters' poses", SA, SB),
                        ("each at its own fitted poses: B at PB - A at PA", sub(A), sub(B2)),
                        ("crossed: B at PA - A at PB", sub(A2), sub(B))):
        print_table(f"{title}; {tail}", paired_differences(a, b, args.block, args.resamples))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
