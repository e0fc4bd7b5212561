"""``fmgs-export RUN_DIR --out BUNDLE_DIR``: bake a trained avatar into an engine bundle.

Exit status: 0 success; 1 the bundle was written but the fp32 ONNX Runtime parity check
failed (numbers in ``BUNDLE_DIR/export_report.json``); 2 bad input (message names the
file, no traceback); 130 interrupted (nothing is left at ``BUNDLE_DIR``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fmgs.bundle import GRAPH_LAYOUTS, PLANAR
from fmgs.errors import run_cli


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run :func:`fmgs.export.api.export_run`; returns the exit status."""
    ap = argparse.ArgumentParser(
        prog="fmgs-export",
        description="Bake a trained FMGS avatar (fmgs-train run folder) into a versioned engine bundle: "
                    "manifest.json, surfels.safetensors, ONNX models (+ TensorRT engines on GPU machines), "
                    "export_report.json and avatar.ply. Layout: docs/bundle.md.")
    ap.add_argument("run_dir", type=Path, help="run folder written by fmgs-train")
    ap.add_argument("--out", type=Path, required=True, help="bundle folder to create")
    ap.add_argument("--fp16", action="store_true",
                    help="also write float16 ONNX copies (<model>.fp16.onnx, fp32 I/O) and fp16 TensorRT engines; "
                         "the fp32 models stay the reference")
    ap.add_argument("--trt", choices=("auto", "on", "off"), default="auto",
                    help="TensorRT engines: auto = when tensorrt imports (default), on = required, off = never")
    ap.add_argument("--check", dest="check", action="store_true", default=True,
                    help="run the ORT parity and skinning-bake checks (default)")
    ap.add_argument("--no-check", dest="check", action="store_false", help="skip the checks")
    ap.add_argument("--parity-frames", type=int, default=3, help="training frames for the parity check (3)")
    ap.add_argument("--bake-frames", type=int, default=32,
                    help="training frames for the skinning-bake check (32; 0 = all)")
    ap.add_argument("--no-skinning-model", action="store_true", help="do not export the optional skinning.onnx")
    ap.add_argument("--no-ply", action="store_true", help="do not write avatar.ply")
    ap.add_argument("--compact-ply", action="store_true",
                    help="avatar.ply without the 45 zero f_rest_* properties (smaller; some loaders need them)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override applied over the run's config.yaml (repeatable), for runs trained "
                         "before a key existed, e.g. --set model.full.geometry_width=128")
    ap.add_argument("--no-fold", action="store_true",
                    help="store the raw hash-grid features f_g, f_c instead of the folded first-layer products "
                         "W_1 f (slower per frame; docs/bundle.md)")
    ap.add_argument("--layout", choices=GRAPH_LAYOUTS, default=PLANAR,
                    help="per-surfel layout of the geometry and colour graphs: planar (default, faster) or rows "
                         "(the row-major graphs that fmgs-play versions before the planar layout read)")
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads for the checks (2)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing bundle folder")
    args = ap.parse_args(argv)

    from fmgs.export.api import ExportCheckFailed, export_run

    def go():
        export_run(args.run_dir, args.out, fp16=args.fp16, trt=args.trt, check=args.check,
                   parity_frames=args.parity_frames, bake_frames=args.bake_frames,
                   skinning_model=not args.no_skinning_model, ply=not args.no_ply, ply_sh_rest=not args.compact_ply,
                   overrides=tuple(args.overrides), overwrite=args.overwrite, threads=args.threads,
                   fold=not args.no_fold, layout=args.layout)

    return run_cli(go, {ExportCheckFailed: 1})


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
