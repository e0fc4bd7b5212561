"""``fmgs-prep``: data preparation commands.

``fmgs-prep priors --sequence ROOT (--from-sapiens DIR | --sapiens-model PATH [...] |
--from-body-model) [--out DIR] [--frames SPEC] [--normal-convention C] ...`` writes the
per-frame priors of a HumanNeRF-format sequence in the format of :mod:`fmgs.priors`
(documented in ``docs/priors.md``).

``fmgs-prep video INPUT --out SEQ [...]`` turns a raw video into a HumanNeRF-format sequence
(:mod:`fmgs.trainer.video`). Errors are printed as ``error: ...`` with exit status 2.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from fmgs.errors import FmgsInputError
from fmgs.errors import run_cli

__all__ = ["prep_main", "prep_entry", "parse_frames"]


def parse_frames(spec: str | None, all_names: list[str]) -> list[str]:
    """Frame selection: None = all; else comma-separated items, each a frame name, a frame
    number, or a Python-style slice ``start:stop[:step]`` of frame numbers.

    Raises:
        FmgsInputError: unknown name, number out of range, malformed item, empty result.
    """
    if spec is None:
        return list(all_names)
    out: list[str] = []
    n = len(all_names)
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if item in all_names:
            out.append(item)
        elif ":" in item:
            try:
                parts = [int(x) if x else None for x in item.split(":")]
                sl = slice(*parts)
            except (ValueError, TypeError):
                raise FmgsInputError(f"--frames: bad slice {item!r}") from None
            out.extend(all_names[sl])
        else:
            try:
                i = int(item)
            except ValueError:
                raise FmgsInputError(f"--frames: unknown frame {item!r}") from None
            if not 0 <= i < n:
                raise FmgsInputError(f"--frames: frame number {i} out of range 0..{n - 1}")
            out.append(all_names[i])
    if not out:
        raise FmgsInputError(f"--frames {spec!r} selects no frame")
    return list(dict.fromkeys(out))


def _open_out(out: Path, kind: str, producer: str, overwrite: bool):
    """PriorSet for ``out``; refuses to mix producers unless ``overwrite``."""
    from fmgs.priors import MODALITIES, PriorSet

    ps = PriorSet(out)
    if ps.meta is not None and (ps.meta["kind"] != kind or ps.meta["producer"] != producer):
        if not overwrite:
            raise FmgsInputError(
                f"holds priors of another producer ({ps.meta['producer']!r}); choose another "
                "--out or pass --overwrite (which deletes them)", out)
        import shutil

        for m in MODALITIES:
            shutil.rmtree(out / m, ignore_errors=True)
        ps.meta_path.unlink()
        ps.meta = None
    return ps


def _finish(ps, meta_fn, written: list[str], modalities, t0: float) -> None:
    old = ps.meta["frames"] if ps.meta is not None else []
    frames = sorted(set(old) | set(written))
    present = [m for m in modalities if m in ps.modalities()]
    ps.write_meta(meta_fn(frames, present))
    dt = time.perf_counter() - t0
    print(f"wrote priors of {len(written)} frames ({', '.join(present) or 'nothing'}) to "
          f"{ps.root} in {dt:.1f} s ({dt / max(1, len(written)):.3f} s/frame)")


def _body_model(args, seq, names):
    from tqdm import tqdm

    from fmgs.priors import BodyModelPriorProducer, MODALITIES

    prod = BodyModelPriorProducer(seq, parts_path=args.smpl_parts)
    ps = _open_out(args.out, "body-model", prod.producer, args.overwrite)
    cam0 = seq.camera(names[0])
    t0 = time.perf_counter()
    for name in tqdm(names, desc="body-model priors", unit="frame"):
        r = prod.render(name)
        ps.write(name, mask=r["mask"], depth=r["depth"], normal=r["normal"], parts=r["parts"])
    _finish(ps, lambda fr, mods: prod.meta(fr, cam0.width, cam0.height), names, MODALITIES, t0)


def _sapiens(args, seq, names, models=None):
    from tqdm import tqdm

    from fmgs.priors import MODALITIES, make_meta
    from fmgs.sapiens import SapiensConverter, read_sapiens_frame, undistort_map
    from fmgs.trainer.data.humannerf import read_image, read_mask, undistort_image

    conv = SapiensConverter(normal_convention=args.normal_convention)
    if models is None:
        producer = "sapiens-lite outputs (converted by fmgs-prep)"
        src = Path(args.from_sapiens)
        source = str(src)
    else:
        producer = "sapiens torchscript (run by fmgs-prep)"
        source = [str(m.path) for m in models]
    ps = _open_out(args.out, "foundation-model", producer, args.overwrite)
    if models is None:
        if not src.is_dir():
            raise FmgsInputError("Sapiens output folder not found", src)
        if not any((src / s).is_dir() for s in ("seg", "depth", "normal")):
            raise FmgsInputError("no seg/, depth/ or normal/ sub-folder of Sapiens outputs", src)
    cam0 = seq.camera(names[0])
    written, empty = [], []
    t0 = time.perf_counter()
    for name in tqdm(names, desc="sapiens priors", unit="frame"):
        cam = seq.camera(name)
        K_raw, _, D = seq._cam_raw[name]
        distorted = D is not None and np.any(D != 0) and seq.undistort
        maps = None
        mask_seq = read_mask(seq.root / "masks" / f"{name}.png") * 255
        if distorted:
            mask_seq = undistort_image(mask_seq.astype(np.uint8), K_raw, D, nearest=True)
        if models is None:
            raw = read_sapiens_frame(src, name)
            if distorted and not args.inputs_undistorted:
                maps = undistort_map(K_raw, D, cam.width, cam.height)
        else:
            from fmgs.trainer.data.sapiens_run import run_models

            img = read_image(seq.root / "images" / f"{name}.png")
            if distorted:
                img = undistort_image(img, K_raw, D)
            raw = run_models(models, img)
        if all(raw[k] is None for k in ("seg", "depth", "normal")):
            empty.append(name)
            continue
        out = conv.convert(raw, (cam.height, cam.width), K=cam.K, undistort_maps=maps,
                           fallback_mask=mask_seq)
        ps.write(name, **out)
        written.append(name)
    if empty:
        print(f"note: {len(empty)} of {len(names)} frames have no Sapiens output "
              f"(e.g. {empty[0]}); skipped")
    if not written:
        raise FmgsInputError("no Sapiens output found for any selected frame",
                             args.from_sapiens or None)

    def meta(frames, mods):
        return make_meta(producer, "foundation-model", cam0.width, cam0.height, frames, mods,
                         depth_units="relative",
                         extra={"source": source,
                                "normal_source_convention": conv.resolved_convention,
                                "undistorted_by_fmgs_prep": bool(
                                    models is not None or not args.inputs_undistorted)})
    _finish(ps, meta, written, MODALITIES, t0)


def _refine(args) -> None:
    """``fmgs-prep refine``: :func:`fmgs.trainer.engine.refine.refine_training_poses`."""
    from fmgs.trainer.engine.refine import RefineSettings, refine_training_poses

    kw = {} if args.lr is None else {"lr_pose": float(args.lr[0]), "lr_translation": float(args.lr[1])}
    rep = refine_training_poses(args.run, args.out, every=args.every,
                                settings=RefineSettings(iterations=int(args.steps), **kw),
                                overwrite=args.overwrite, overrides=tuple(args.set),
                                progress=not args.no_progress, held_out=args.held_out_steps)
    if rep["refined_frames"]:
        print(f"refined {rep['refined_frames']} of {rep['training_frames']} training frames "
              f"(loss {rep['loss_first_mean']:.4f} -> {rep['loss_last_mean']:.4f}, mean joint change "
              f"{rep['mean_joint_rotation_change_deg']:.2f} deg, translation "
              f"{rep['mean_translation_change_mm']:.1f} mm)")
    h = rep["held_out"]
    if h["refined_frames"]:
        print(f"fitted {h['refined_frames']} validation and test poses to their masks "
              f"(mask loss {h['loss_first_mean']:.4f} -> {h['loss_last_mean']:.4f})")
    print(f"{rep['refine_s'] / 60:.1f} min -> {args.out}\n"
          f"next: fmgs-train --out RUN2 data.root={args.out} (same settings as {args.run})")


def prep_main(argv: list[str] | None = None) -> int:
    """Entry point of ``fmgs-prep``; returns the exit status (0, 2 on input errors)."""
    ap = argparse.ArgumentParser(prog="fmgs-prep", description="Prepare data for fmgs-avatar.")
    sub = ap.add_subparsers(dest="command", required=True)
    pr = sub.add_parser(
        "priors", help="write per-frame priors (mask, depth, normal, parts)",
        description="Write the per-frame priors of a HumanNeRF-format sequence "
                    "(format: docs/priors.md).")
    src = pr.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-sapiens", metavar="DIR",
                     help="convert Sapiens lite outputs in DIR/seg, DIR/depth, DIR/normal")
    src.add_argument("--sapiens-model", metavar="PATH", action="append",
                     help="run a Sapiens TorchScript checkpoint (seg, depth or normal); repeat")
    src.add_argument("--from-body-model", action="store_true",
                     help="render the fitted SMPL mesh (no foundation model needed)")
    pr.add_argument("--sequence", required=True, type=Path, metavar="ROOT",
                    help="HumanNeRF-format sequence folder")
    pr.add_argument("--out", type=Path, default=None, help="priors folder (default ROOT/priors)")
    pr.add_argument("--smpl-path", type=Path, default=None,
                    help="SMPL model pickle (default $FMGS_DATA/body_models/smpl/SMPL_NEUTRAL.pkl)")
    pr.add_argument("--smpl-parts", type=Path, default=None,
                    help="smplh_parts_segm.pkl (default: next to the SMPL model; else "
                         "argmax skinning weights)")
    pr.add_argument("--frames", default=None,
                    help="frames: comma-separated names, numbers or start:stop[:step] slices")
    from fmgs.sapiens import NORMAL_CONVENTIONS

    pr.add_argument("--normal-convention", default="auto",
                    choices=["auto", *NORMAL_CONVENTIONS],
                    help="axes of the Sapiens normals (default: detect, then check every frame)")
    pr.add_argument("--inputs-undistorted", action="store_true",
                    help="--from-sapiens outputs were computed on undistorted images "
                         "(default: on the raw images/, so fmgs-prep undistorts them)")
    pr.add_argument("--device", default="cpu", help="torch device for --sapiens-model")
    pr.add_argument("--overwrite", action="store_true",
                    help="replace priors of another producer in --out")
    from fmgs.trainer.video.cli import add_video_parser, run_video

    add_video_parser(sub)
    rf = sub.add_parser(
        "refine", help="refine a run's training poses against its images (bootstrap round)",
        description="Write a copy of a trained run's sequence whose training poses are fitted to "
                    "their images with the avatar frozen; train a new run on it "
                    "(docs/benchmarks.md, 'Bootstrap').")
    rf.add_argument("run", type=Path, help="a folder written by fmgs-train")
    rf.add_argument("--out", required=True, type=Path, help="the new sequence folder")
    rf.add_argument("--every", type=int, default=4,
                    help="refine every N-th training frame, interpolate the others (default 4)")
    rf.add_argument("--steps", type=int, default=40,
                    help="Adam steps per refined training frame (default 40; 0 leaves the training "
                         "poses, with --held-out-steps)")
    rf.add_argument("--held-out-steps", type=int, default=0, metavar="N",
                    help="also fit every validation and test frame's pose to its mask only (no "
                         "colour of a scored frame), N Adam steps each (default 0 = leave them; "
                         "80 is the validation-chosen setting)")
    rf.add_argument("--lr", type=float, nargs=2, default=None, metavar=("POSE", "TRANS"),
                    help="learning rates: joint rotations (rad), translation (m) (default 0.01 0.003)")
    rf.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override the run's config (e.g. data.root=... if the sequence moved)")
    rf.add_argument("--overwrite", action="store_true", help="replace a refined sequence written before")
    rf.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if args.command == "video":
        return run_cli(lambda: run_video(args))
    if args.command == "refine":
        return run_cli(lambda: _refine(args))

    def go():
        from fmgs.trainer.data.humannerf import HumanNeRFSequence

        seq = HumanNeRFSequence(args.sequence, split="all", smpl_path=args.smpl_path)
        names = parse_frames(args.frames, seq.all_names)
        args.out = args.out or args.sequence / "priors"
        if args.from_body_model:
            _body_model(args, seq, names)
        elif args.from_sapiens:
            _sapiens(args, seq, names)
        else:
            from fmgs.trainer.data.sapiens_run import load_sapiens_models

            _sapiens(args, seq, names, models=load_sapiens_models(args.sapiens_model, args.device))

    return run_cli(go)


def prep_entry() -> None:
    """Console-script wrapper: exit with :func:`prep_main`'s status."""
    sys.exit(prep_main())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(prep_main())
