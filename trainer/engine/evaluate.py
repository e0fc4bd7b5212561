"""``fmgs-eval RUN_DIR``: render the held-out frames and score them.

Writes into ``RUN_DIR/eval/`` (or ``--out``):

- ``metrics.json``: mean and per-frame PSNR and SSIM (full image, the configured
  background, as the 3DGS-Avatar ZJU-MoCap protocol), LPIPS when its backbone
  weights can be loaded from local files, otherwise ``null`` with the reason;
  library versions (scikit-image changes SSIM values) and render timing.
- ``images/<frame>.png``: ground truth | render | absolute error, side by side.
- ``video.mp4``: the side-by-side images as a video (H.264 through imageio-ffmpeg).
- ``modes/<frame>.png`` and ``modes.mp4``: the multi-modal renders of the paper's
  Fig. 3-4 side by side: RGB | depth | rendered normal | normal from depth | semantic
  map (the last for the full model with its semantic field).
"""
from __future__ import annotations

import dataclasses
import platform
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from fmgs.atomic import write_json_atomic
from fmgs.errors import FmgsInputError
from fmgs.media import write_video
from fmgs.trainer.engine.metrics import (
    LPIPSMetric, psnr, semantic_confusion, semantic_scores, silhouette_errors, ssim_metric,
)
from fmgs.trainer.engine.refine import RefineSettings, refine_frame_pose
from fmgs.trainer.engine.run import heldout_renders, load_run, render_frame, to_host


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def modal_panels(out, K: np.ndarray) -> list[np.ndarray]:
    """Visualisations of one render: RGB, depth, rendered normal, normal from depth,
    semantic map (when ``out.extras`` holds 28 semantic logits).

    Args:
        out: :class:`fmgs.trainer.render.dispatch.RenderOutput` (no grad needed).
        K: (3, 3) intrinsics of the render, pixels.

    Returns:
        List of (H, W, 3) uint8 images. Depth: expected depth, min-max normalised over the
        pixels with alpha > 0.5 and shown with OpenCV's TURBO colour map (near = red);
        normals: camera-space unit normals as ``(n + 1) / 2`` (OpenCV axes); background black.
    """
    import cv2

    from fmgs.priors import colorize_labels
    from fmgs.trainer.losses.terms import normal_from_depth

    with torch.no_grad():
        fg = (out.alpha > 0.5).numpy()
        rgb = _to_uint8(out.rgb.clamp(0, 1).numpy())
        d = out.depth.numpy()
        depth_vis = np.zeros_like(rgb)
        if fg.any():
            lo, hi = float(d[fg].min()), float(d[fg].max())
            z = np.clip((hi - d) / max(hi - lo, 1e-6), 0, 1)
            depth_vis = cv2.applyColorMap((z * 255).astype(np.uint8), cv2.COLORMAP_TURBO)[..., ::-1]
        n = torch.nn.functional.normalize(out.normal, dim=-1).numpy()
        nd = normal_from_depth(out.depth, torch.as_tensor(K, dtype=out.depth.dtype)).numpy()
        panels = [rgb, depth_vis, _to_uint8((n + 1) / 2), _to_uint8((nd + 1) / 2)]
        if out.extras is not None and out.extras.shape[-1] == 28:
            panels.append(colorize_labels(out.extras.argmax(-1).numpy()))
    return [np.where(fg[..., None], p, 0).astype(np.uint8) for p in panels]


def _refined_renders(model, setup, seq, cfg, indices, refine: RefineSettings, mask_seq=None):
    """``((frame, stats), render)`` for each frame: its pose refined against its image
    (:func:`refine_frame_pose`), then rendered without gradients at the refined pose.
    ``mask_seq``: a sequence with the same frame names whose masks the refinement fits
    instead of ``seq``'s (the returned frame keeps ``seq``'s mask, the scoring one)."""
    from tqdm import tqdm

    with model.frozen():     # pose-independent parts computed once for all the frames
        for i in tqdm(list(indices), desc="eval (refining poses)", unit="frame"):
            fr = seq[int(i)]
            fit = fr if mask_seq is None else dataclasses.replace(fr, mask=mask_seq[int(i)].mask)
            ref, st = refine_frame_pose(model, setup, fit, cfg, refine)
            ref = dataclasses.replace(ref, mask=fr.mask)
            with torch.no_grad():
                yield (ref, st), to_host(render_frame(model, setup, ref, cfg))


def _refine_mask_sequence(cfg, seq, split: str, root):
    """The sequence at ``root`` opened like ``seq`` (same split settings), whose masks the
    pose refinement fits; its frame names must be ``seq``'s.

    Raises:
        FmgsInputError: ``root`` is not a HumanNeRF-format sequence, or its split holds other
            frames than the scored one (names the folder).
    """
    from omegaconf import OmegaConf

    from fmgs.trainer.engine.run import open_sequence

    c = OmegaConf.merge(cfg, {"data": {"root": str(root)}})
    other = open_sequence(c, split)
    if list(other.names) != list(seq.names):
        raise FmgsInputError(f"--refine-masks-from: its {split} split holds other frames than the scored "
                             f"sequence's ({len(other)} vs {len(seq)} frames, first {other.names[:1]} vs "
                             f"{seq.names[:1]})", root)
    return other


def evaluate(run_dir: Path, out_dir: Path | None = None, max_frames: int | None = None,
             video: bool = True, overrides: tuple[str, ...] = (), split: str = "test",
             refine: RefineSettings | None = None, refine_masks_from: Path | None = None,
             ablation: tuple[str, Callable] | None = None) -> dict:
    """Render and score the test split of a trained run.

    Args:
        run_dir: a folder written by ``fmgs-train``.
        out_dir: output folder (default ``RUN_DIR/eval``).
        max_frames: evaluate only the first N test frames (None: the whole split; >= 1).
        video: also write ``video.mp4`` and ``modes.mp4``.
        overrides: ``key=value`` entries over the run's config (a misspelt key fails).
        split: ``test`` (the held-out protocol), ``val`` (the validation part of the
            training range, ``data.val_fraction``; default output ``RUN_DIR/eval_val``) or
            ``train`` (the training frames, rendered like held-out ones: without the full
            model's per-frame pose correction; ``RUN_DIR/eval_train``).
        refine: test-time pose refinement of every scored frame before rendering it
            (:mod:`fmgs.trainer.engine.refine`; a different protocol: the default output
            folder gets a ``_refined`` suffix, ``_refined_silhouette`` when the refinement fits the
            mask only, and ``metrics.json`` records the settings).
        refine_masks_from: a sequence folder (the same frames) whose masks the refinement
            fits instead of the scored sequence's: score against one set of masks (e.g. a
            dataset's) while the poses are fitted to another (the own-video pipeline's).
        ablation: ``(name, change)``: ``change(run)`` is called with the loaded run
            (:class:`~fmgs.trainer.engine.run.LoadedRun`) before any frame is rendered and may
            replace parts of ``run.model`` (an evaluation-time ablation,
            ``benchmarks/component_ablation.py``); ``name`` is recorded as ``metrics.json``'s
            ``ablation`` (None without one). Give it its own ``out_dir``.

    Returns:
        The metrics dictionary written to ``metrics.json``.

    Raises:
        FmgsInputError: missing run files or data (names the file), ``max_frames < 1`` or
            an empty test split. ``metrics.json`` is replaced (atomically) only once every
            frame is scored, so a failed evaluation never clobbers an earlier result.
    """
    import imageio.v3 as iio
    import skimage

    if max_frames is not None and (isinstance(max_frames, bool) or int(max_frames) < 1):
        raise FmgsInputError(f"--max-frames must be a positive number of frames, got {max_frames!r}")
    if split not in ("test", "val", "train"):
        raise FmgsInputError(f"--split must be test, val or train, got {split!r}")
    run = load_run(run_dir, overrides, split=split)
    if ablation is not None:
        ablation[1](run)
    run_dir, cfg, seq, setup, model = run.run_dir, run.cfg, run.seq, run.setup, run.model
    refining = refine is not None and refine.iterations > 0
    suffix = "" if not refining else "_refined" if float(refine.photometric) > 0 else "_refined_silhouette"
    default_out = ("eval" if split == "test" else f"eval_{split}") + suffix
    out_dir = Path(out_dir) if out_dir else run_dir / default_out
    lpips = LPIPSMetric()
    if not lpips.available:
        print(f"LPIPS: not computed ({lpips.reason})")

    n = len(seq) if max_frames is None else min(len(seq), int(max_frames))
    per_frame, sides, modes, times = [], [], [], []
    # semantic maps vs the part labels of the test frames' priors, where they exist
    sem_labels = None
    if model.semantic_classes:
        from fmgs.priors import load_priors

        pri = load_priors(cfg.data.root, [seq[i].name for i in range(n)], int(cfg.data.image_size),
                          cfg.data.priors_dir, verbose=False)
        sem_labels = [p.get("parts") for p in pri]
    confusion = None
    images: list[tuple[str, np.ndarray, np.ndarray]] = []
    t0 = time.perf_counter()
    mask_seq = None
    if refining and refine_masks_from is not None:
        mask_seq = _refine_mask_sequence(cfg, seq, split, refine_masks_from)
    renders = (_refined_renders(model, setup, seq, cfg, range(n), refine, mask_seq) if refining
               else heldout_renders(model, setup, seq, cfg, range(n), progress=True))
    refine_stats = []
    for i, (fr, out) in enumerate(renders):
        times.append(time.perf_counter() - t0)
        if refining:
            fr, st = fr
            refine_stats.append(st)
        pred = out.rgb.clamp(0, 1).numpy()
        gt = fr.image
        sil = silhouette_errors(out.alpha.numpy(), fr.mask)
        rec = {"frame": fr.name, "psnr": psnr(pred, gt), "ssim": ssim_metric(pred, gt),
               "silhouette_iou": sil["iou"], "silhouette_missed": sil["missed"], "silhouette_extra": sil["extra"]}
        rec["lpips"] = lpips(pred, gt) if lpips.available else None
        if refining:
            rec["pose_refinement"] = refine_stats[-1]
        if sem_labels is not None and sem_labels[i] is not None and out.extras is not None:
            cm = semantic_confusion(out.extras.numpy(), out.alpha.numpy(), sem_labels[i], out.extras.shape[-1])
            rec["semantic_accuracy"] = semantic_scores(cm)["pixel_accuracy"]
            confusion = cm if confusion is None else confusion + cm
        per_frame.append(rec)
        err = np.abs(pred - gt).mean(-1, keepdims=True).repeat(3, -1)
        side = _to_uint8(np.concatenate([gt, pred, np.clip(err * 4.0, 0, 1)], axis=1))
        sides.append(side)
        row = np.concatenate(modal_panels(out, fr.camera.K), axis=1)
        modes.append(row)
        images.append((fr.name, side, row))
        t0 = time.perf_counter()

    if not per_frame:  # nothing new to report: keep the previous metrics.json as it is
        raise FmgsInputError("the test split has no frames to evaluate (metrics.json left unchanged)", run_dir)

    def mean(key):
        vals = [r[key] for r in per_frame if r[key] is not None]
        return float(np.mean(vals)) if vals and len(vals) == len(per_frame) else None

    metrics = {
        "run_dir": str(run_dir),
        "iteration": run.iteration,
        "train_minutes": round(run.elapsed_s / 60.0, 2),
        "split": split,
        "num_frames": len(per_frame),
        "resolution": [int(seq[0].image.shape[1]), int(seq[0].image.shape[0])],
        "background": list(cfg.data.background),
        "psnr": mean("psnr"),
        "ssim": mean("ssim"),
        # rendered alpha > 0.5 vs the frame's mask > 0.5
        "silhouette_iou": mean("silhouette_iou"),
        # the rest of the union: mask not covered by the render / render outside the mask
        "silhouette_missed": mean("silhouette_missed"),
        "silhouette_extra": mean("silhouette_extra"),
        "num_surfels": int(model.num_surfels),
        "lpips": mean("lpips"),
        "lpips_note": None if lpips.available else lpips.reason,
        "render_seconds_per_frame": float(np.mean(times)) if times else None,
        # test-time pose refinement (None: each frame is rendered at its own pose)
        "pose_refinement": None if not refining else {
            **dataclasses.asdict(refine),
            "masks_from": str(Path(refine_masks_from).resolve()) if refine_masks_from is not None else None,
            "mean_rotation_deg": float(np.mean([r["rotation_deg"] for r in refine_stats])),
            "mean_translation_mm": float(np.mean([r["translation_mm"] for r in refine_stats]))},
        # rendered part labels vs the priors' part labels (foreground pixels of the frames
        # that have priors); None without a semantic field or priors for the test frames
        "ablation": None if ablation is None else str(ablation[0]),
        "semantic": None if confusion is None else {
            **semantic_scores(confusion), "frames": sum(1 for r in per_frame if "semantic_accuracy" in r),
            "labels": "priors parts (" + str(cfg.data.priors_dir or "<root>/priors") + ")"},
        "versions": {"scikit-image": skimage.__version__, "torch": torch.__version__,
                     "python": platform.python_version()},
        "frames": per_frame,
    }
    # Every frame is scored: only now replace what an earlier evaluation wrote.
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "modes").mkdir(parents=True, exist_ok=True)
    for name, side, row in images:
        iio.imwrite(out_dir / "images" / f"{name}.png", side)
        iio.imwrite(out_dir / "modes" / f"{name}.png", row)
    if video and sides:
        for name, frames in (("video.mp4", sides), ("modes.mp4", modes)):
            write_video(out_dir / name, frames, fps=int(cfg.eval.video_fps))
    write_json_atomic(out_dir / "metrics.json", metrics)
    print(f"{split}{' (poses refined)' if refining else ''} ({len(per_frame)} frames): PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.4f}, "
          f"silhouette IoU {metrics['silhouette_iou']:.4f} (missed {metrics['silhouette_missed']:.4f}, "
          f"extra {metrics['silhouette_extra']:.4f}), "
          f"LPIPS {metrics['lpips'] if metrics['lpips'] is not None else 'n/a'} -> {out_dir}")
    if metrics["semantic"]:
        s = metrics["semantic"]
        print(f"semantic vs prior part labels ({s['frames']} frames): pixel accuracy {s['pixel_accuracy']:.3f}, "
              f"mIoU {s['miou']:.3f} over {s['classes']} classes")
    return metrics
