"""Command-line entry points ``fmgs-train`` and ``fmgs-eval``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fmgs.errors import FmgsInputError, run_cli


def train_main(argv: list[str] | None = None) -> int:
    """``fmgs-train [--config C] [--out RUN_DIR | --resume RUN_DIR] [--init aggregate] [--preview] [key=value ...]``."""
    ap = argparse.ArgumentParser(
        prog="fmgs-train",
        description="Fit an FMGS avatar to a monocular video (HumanNeRF-format folder), then evaluate it.",
        epilog="Overrides use OmegaConf dot-lists, e.g. train.iterations=500 data.image_size=256. "
               "Every key with its default and meaning: fmgs/config.py (fmgs-train --show-config prints "
               "them resolved). The defaults are a short demo on ZJU-MoCap 377.",
    )
    ap.add_argument("--config", help="config file, or the name of a shipped one (e.g. zju377_60min)")
    ap.add_argument("--out", type=Path, default=None, help="run folder (default: runs/<config name>)")
    ap.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                    help="continue an interrupted run from its last checkpoint")
    ap.add_argument("--no-eval", action="store_true",
                    help="skip the held-out evaluation at the end (sets train.eval_at_end=false in the "
                         "run's config, so a --resume of the run skips it too)")
    ap.add_argument("--init", choices=["none", "aggregate"], default=None,
                    help="initialisation before training (sets init.kind): aggregate = fuse all training "
                         "frames onto the surfels and warm-start the appearance field")
    ap.add_argument("--preview", action="store_true",
                    help="only aggregate the frames and write a playable preview bundle to OUT/preview "
                         "(default OUT: runs/preview), with held-out PSNR/SSIM unless --no-eval")
    ap.add_argument("--show-config", action="store_true",
                    help="print the resolved configuration (defaults, --config, overrides) and exit")
    ap.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = ap.parse_args(argv)
    if args.init is not None:
        args.overrides = [*args.overrides, f"init.kind={args.init}"]

    def go():
        from omegaconf import OmegaConf

        from fmgs.config import load_config, load_run_config
        from fmgs.trainer.engine.checkpoint import checkpoint_path
        from fmgs.trainer.engine.evaluate import evaluate
        from fmgs.trainer.engine.train import train
        from fmgs.trainer.init.aggregate import apply_init

        if args.show_config:
            print(OmegaConf.to_yaml(load_config(args.config, args.overrides)), end="")
            return
        if args.preview:
            if args.resume is not None:
                raise FmgsInputError("--preview cannot be combined with --resume")
            from fmgs.trainer.init.aggregate import run_preview

            run_preview(load_config(args.config, args.overrides), args.out or Path("runs") / "preview",
                        evaluate=not args.no_eval)
            return
        if args.resume is not None:
            if args.config or args.overrides or args.out:
                raise FmgsInputError("--resume reuses the run's own config.yaml; drop --config/--out/overrides")
            run_dir = args.resume
            cfg = load_run_config(run_dir)
            train(cfg, run_dir, resume=True)
        else:
            cfg = load_config(args.config, args.overrides)
            if args.no_eval:  # recorded in the run's config.yaml, so that --resume honours it too
                cfg.train.eval_at_end = False
            name = Path(args.config).stem if args.config else "demo"
            run_dir = args.out or Path("runs") / name
            if checkpoint_path(run_dir).exists():
                raise FmgsInputError(
                    "this run folder already holds a checkpoint; continue it with "
                    f"'fmgs-train --resume {run_dir}' or choose another --out", run_dir)
            train(cfg, run_dir, initialise=apply_init)
        if cfg.train.eval_at_end and not args.no_eval:
            if cfg.data.val_fraction > 0:
                evaluate(run_dir, max_frames=cfg.eval.max_frames, split="val")
            evaluate(run_dir, max_frames=cfg.eval.max_frames)

    return run_cli(go)


def eval_main(argv: list[str] | None = None) -> int:
    """``fmgs-eval RUN_DIR [--out DIR] [--max-frames N] [--no-video] [--split test|val|train]
    [--refine-poses N [--refine-lr P T] [--refine-objective image|silhouette] [--refine-masks-from SEQ]]``."""
    ap = argparse.ArgumentParser(prog="fmgs-eval",
                                 description="Render a trained avatar's held-out frames and write metrics, images and a video.")
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="output folder (default RUN_DIR/eval)")
    ap.add_argument("--max-frames", type=int, default=None, help="evaluate only the first N test frames (N >= 1)")
    ap.add_argument("--no-video", action="store_true")
    ap.add_argument("--split", choices=("test", "val", "train"), default="test",
                    help="test frames (default), the validation frames carved from the training range "
                         "(data.val_fraction > 0; written to RUN_DIR/eval_val) or the training frames "
                         "(RUN_DIR/eval_train)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override over the run's config.yaml (repeatable), e.g. --set train.backend=cpu")
    ap.add_argument("--refine-poses", type=int, default=0, metavar="N",
                    help="test-time pose refinement: N Adam steps per frame fitting its SMPL pose to its image "
                         "with the avatar frozen before scoring (the monocular-video protocol of InstantAvatar/"
                         "3DGS-Avatar on PeopleSnapshot); written to RUN_DIR/eval_refined")
    ap.add_argument("--refine-lr", type=float, nargs=2, default=None, metavar=("POSE", "TRANSLATION"),
                    help="learning rates of the pose (rad) and translation (m) refinement")
    ap.add_argument("--refine-objective", choices=("image", "silhouette"), default="image",
                    help="what the refinement fits: the frame's image and mask (default; the monocular-video "
                         "protocol) or only its mask, with the avatar's silhouette (the information a per-frame "
                         "SMPL fit uses: no colour of the scored frame)")
    ap.add_argument("--refine-masks-from", type=Path, default=None, metavar="SEQ",
                    help="fit the refinement to the masks of this sequence (same frames) instead of the scored "
                         "one's, e.g. the own-video pipeline's masks while scoring against a dataset's")
    args = ap.parse_args(argv)
    if args.refine_poses < 0:
        ap.error("--refine-poses must be >= 0")
    if args.refine_poses == 0 and (args.refine_objective != "image" or args.refine_masks_from is not None):
        ap.error("--refine-objective and --refine-masks-from need --refine-poses N (N >= 1)")

    def go():
        from fmgs.trainer.engine.evaluate import evaluate
        from fmgs.trainer.engine.refine import RefineSettings

        kw = {"photometric": 0.0 if args.refine_objective == "silhouette" else 1.0}
        if args.refine_lr:
            kw.update(lr_pose=args.refine_lr[0], lr_translation=args.refine_lr[1])
        refine = RefineSettings(iterations=args.refine_poses, **kw)
        evaluate(args.run_dir, out_dir=args.out, max_frames=args.max_frames, video=not args.no_video,
                 overrides=tuple(args.overrides), split=args.split, refine=refine,
                 refine_masks_from=args.refine_masks_from)

    return run_cli(go)


def train_entry() -> None:
    """Console-script wrapper: exit with :func:`train_main`'s status."""
    sys.exit(train_main())


def eval_entry() -> None:
    """Console-script wrapper: exit with :func:`eval_main`'s status."""
    sys.exit(eval_main())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(train_main())
