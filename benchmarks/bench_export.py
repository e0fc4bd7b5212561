"""Benchmark an engine bundle: per-frame ONNX Runtime CPU time of each model, export time, size.

Usage::

    # export first (timed), then benchmark the bundle
    python benchmarks/bench_export.py --run runs/full1000 --bundle /tmp/b377 [--set KEY=VALUE ...]
    # benchmark an existing bundle
    python benchmarks/bench_export.py --bundle /tmp/b377 [--repeats 20] [--json out.json]

For every model of the bundle's pipeline (and the optional skinning model) it times one
frame's inference on all ``S`` surfels with the bundle's own arrays as inputs (a real
training pose's rotations for the pose encoder), for each ONNX Runtime configuration of
``--threads`` x ``--opt-levels`` and for the fp32 and (if present) fp16 models. Reports the
median, minimum and 10th/90th percentiles over ``--repeats`` runs after 3 warm-ups, the
pipeline total (sum of the medians, and of the minima, of the per-frame models), the median
process CPU time per run (with one thread: the compute cost, whatever else shares the
cores; with more threads it includes ONNX Runtime's spinning) and the machine's load average
before and after. Torch is needed only with ``--run``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np


def _session(path, threads, level):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                   "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                   "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _inputs(bundle, rng):
    """Per-model input dicts built from the bundle (outputs of upstream models where needed),
    in each graph's layout (row-major or planar, :mod:`fmgs.export.onnx_export`)."""
    from fmgs.body_model import axis_angle_to_matrix
    from fmgs.export.checks import layout_feeds, run_rows

    s = bundle.surfels
    S = bundle.num_surfels
    rot = axis_angle_to_matrix(rng.normal(scale=0.3, size=(24, 3))).astype(np.float32)
    d = rng.normal(size=(S, 3)).astype(np.float32)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    feeds = {}
    z = None
    zg = None
    if "pose_encoder" in bundle.models:
        feeds["pose_encoder"] = {"rot_mats": rot}
        (z,) = _session(bundle.models["pose_encoder"], 2, "all").run(None, feeds["pose_encoder"])
    if "geometry" in bundle.models:
        feeds["geometry"] = {"geometry_features": s["geometry_features"], "pose_code": z, "centers": s["centers"],
                             "rotations": s["rotations"], "scales": s["scales"]}
        sess = _session(bundle.models["geometry"], 2, "all")
        zg = run_rows(sess, bundle.manifest["models"]["geometry"], feeds["geometry"])["z_g"]
    if "color" in bundle.models:
        names = [i["name"] for i in bundle.manifest["models"]["color"]["inputs"]]
        f = {"appearance_features": s["appearance_features"]}
        if {"z_g", "z_g_planar"} & set(names):
            f.update(z_g=zg, pose_code=z)
        if {"view_dirs", "view_dirs_planar"} & set(names):
            f["view_dirs"] = d
        feeds["color"] = f
    for name, f in feeds.items():          # planar graphs: per-surfel inputs with the surfel axis last
        feeds[name] = layout_feeds([i["name"] for i in bundle.manifest["models"][name]["inputs"]], f)
    if "skinning" in bundle.models:
        f = {"points": s["centers"]}
        if any(i["name"] == "prior_weights" for i in bundle.manifest["models"]["skinning"]["inputs"]):
            f["prior_weights"] = s["prior_skin_weights"]
        feeds["skinning"] = f
    return feeds


def bench(bundle_dir: Path, threads=(1, 2), levels=("basic", "all"), repeats: int = 20) -> dict:
    """Time every model of the bundle; returns the results dictionary (see module docstring)."""
    import onnxruntime as ort

    from fmgs.bundle import read_bundle

    b = read_bundle(bundle_dir)
    feeds = _inputs(b, np.random.default_rng(0))
    rows = []
    for prec, models in (("fp32", b.models), ("fp16", b.models_fp16)):
        for name, path in models.items():
            for th in threads:
                for lv in levels:
                    sess = _session(path, th, lv)
                    for _ in range(3):
                        sess.run(None, feeds[name])
                    ts, cpu = [], []
                    for _ in range(repeats):
                        t0, c0 = time.perf_counter(), time.process_time()
                        sess.run(None, feeds[name])
                        ts.append((time.perf_counter() - t0) * 1e3)
                        cpu.append((time.process_time() - c0) * 1e3)
                    rows.append({"model": name, "precision": prec, "threads": th, "opt_level": lv,
                                 "median_ms": float(np.median(ts)), "min_ms": float(np.min(ts)),
                                 "p10_ms": float(np.percentile(ts, 10)), "p90_ms": float(np.percentile(ts, 90)),
                                 "cpu_median_ms": float(np.median(cpu))})
    totals, totals_min = {}, {}
    for prec in ("fp32", "fp16"):
        for th in threads:
            for lv in levels:
                sel = [r for r in rows if r["precision"] == prec and r["threads"] == th and r["opt_level"] == lv
                       and r["model"] in b.pipeline]
                if sel and len(sel) == len(b.pipeline):
                    totals[f"{prec}/threads={th}/{lv}"] = round(sum(r["median_ms"] for r in sel), 2)
                    totals_min[f"{prec}/threads={th}/{lv}"] = round(sum(r["min_ms"] for r in sel), 2)
    size = sum(p.stat().st_size for p in Path(bundle_dir).iterdir() if p.is_file())
    return {"bundle": str(bundle_dir), "num_surfels": b.num_surfels, "pipeline": b.pipeline, "bundle_bytes": size,
            "onnxruntime": ort.__version__, "cpu_count": os.cpu_count(), "repeats": repeats, "rows": rows,
            "pipeline_total_ms": totals, "pipeline_total_min_ms": totals_min}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True, help="bundle folder (written first with --run)")
    ap.add_argument("--run", type=Path, default=None, help="export this run folder first (timed)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override for --run")
    ap.add_argument("--fp16", action="store_true", help="with --run: export fp16 copies too")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--opt-levels", nargs="+", default=["basic", "all"])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    export = None
    if args.run is not None:
        from fmgs.export.api import export_run

        t0 = time.perf_counter()
        rep = export_run(args.run, args.bundle, fp16=args.fp16, overrides=args.overrides, overwrite=True)
        export = {"wall_s": round(time.perf_counter() - t0, 2), "timings": rep["timings"],
                  "bundle_bytes": rep["bundle_bytes"], "parity": rep.get("parity"),
                  "skinning_bake": rep.get("skinning_bake")}
    load0 = os.getloadavg()
    res = bench(args.bundle, tuple(args.threads), tuple(args.opt_levels), args.repeats)
    res["export"] = export
    res["loadavg_before_after"] = [round(load0[0], 2), round(os.getloadavg()[0], 2)]
    for r in res["rows"]:
        print(f"{r['model']:>13} {r['precision']} threads={r['threads']} opt={r['opt_level']:<6} "
              f"median {r['median_ms']:8.2f} ms  (min {r['min_ms']:.2f}, p10 {r['p10_ms']:.2f}, p90 {r['p90_ms']:.2f}; "
              f"cpu {r['cpu_median_ms']:.2f})")
    for k, v in res["pipeline_total_ms"].items():
        print(f"pipeline {res['pipeline']} {k}: {v:.2f} ms/frame (sum of minima {res['pipeline_total_min_ms'][k]:.2f})")
    print(f"load average (1 min) before/after: {res['loadavg_before_after']} on {res['cpu_count']} cores")
    print(f"bundle size {res['bundle_bytes'] / 1e6:.1f} MB, {res['num_surfels']} surfels")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
