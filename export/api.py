"""``export_run``: a training run -> an engine bundle (what ``fmgs-export`` does).

Steps: rebuild the trained avatar (:func:`fmgs.export.bake.load_run`), bake the
pose-independent constants (:func:`fmgs.export.bake.bake`), export the pose/view-dependent
models to ONNX (:func:`fmgs.export.onnx_export.export_models`; ``--fp16`` adds float16
copies), run the checks (:mod:`fmgs.export.checks`), build TensorRT engines when asked and
possible (:mod:`fmgs.export.trt`), write ``avatar.ply`` (:mod:`fmgs.export.ply`) and
``export_report.json``, and hand everything to :func:`fmgs.bundle.write_bundle`, which
publishes the bundle atomically. All intermediate files live in a temporary folder next to
the target that is removed at the end, whatever happens.
"""
from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from fmgs.atomic import clean_stale, staging_prefix
from fmgs.bundle import GRAPH_LAYOUTS, PLANAR, check_bundle_replaceable, write_bundle
from fmgs.errors import FmgsInputError

#: fp16 parity is informational (float16 has ~3 significant digits); this is its threshold
#: for the ``passed`` flag of the fp16 section (never fails the export).
FP16_TOL = 2e-2


class ExportCheckFailed(RuntimeError):
    """The export finished and wrote the bundle, but a built-in check failed (see the report)."""


def export_run(run_dir: str | Path, out: str | Path, *, fp16: bool = False, trt: str = "auto",
               check: bool = True, parity_frames: int = 3, bake_frames: int = 32, skinning_model: bool = True,
               ply: bool = True, ply_sh_rest: bool = True, overrides: tuple[str, ...] | list[str] = (),
               overwrite: bool = False, threads: int = 2, fold: bool = True, layout: str = PLANAR,
               verbose: bool = True) -> dict:
    """Export a trained run into a bundle folder.

    Args:
        run_dir: folder written by ``fmgs-train`` (``config.yaml``, ``checkpoints/last.pt``).
        out: bundle folder to create (``overwrite`` to replace).
        fp16: also write ``<model>.fp16.onnx`` and (with TensorRT) fp16 engines.
        trt: ``"auto"`` (build engines when ``tensorrt`` imports), ``"on"`` (required),
            ``"off"``.
        check: run the parity and skinning-bake checks.
        parity_frames: training frames for the ORT parity check.
        bake_frames: training frames for the skinning-bake check (``<= 0``: all).
        skinning_model: also export ``skinning.onnx`` (full model with a skinning field).
        ply: write ``avatar.ply``; ``ply_sh_rest``: with the 45 zero ``f_rest_*`` properties.
        overrides: OmegaConf dot-list applied over the run config before rebuilding
            (``train.backend`` and ``train.device`` are set to ``cpu``: export runs on the CPU).
        overwrite: replace an existing bundle folder -- only a bundle of ours that does not
            hold ``run_dir`` (:func:`fmgs.bundle.check_bundle_replaceable`).
        threads: ONNX Runtime intra-op threads for the checks.
        fold: bake the per-surfel part of each MLP's first layer into the feature channels
            (exact; faster per frame; ``docs/bundle.md``); False keeps the raw features.
        layout: ``"planar"`` geometry and colour graphs (default; faster, read by runtimes
            since the planar layout) or ``"rows"`` (the row-major graphs older runtimes read);
            :mod:`fmgs.export.onnx_export`.
        verbose: print progress and the report summary.

    Returns:
        The report dictionary (also ``BUNDLE_DIR/export_report.json``).

    Raises:
        FmgsInputError: bad run folder/checkpoint/data, existing ``out``, ``--trt on``
            without TensorRT (names the file), unknown ``layout``.
        ExportCheckFailed: the fp32 parity check failed (the bundle is still written, with
            the report, for inspection).
    """
    import onnxruntime
    import torch

    from fmgs.export.adapters import adapter_for
    from fmgs.export.checks import parity_check
    from fmgs.export.onnx_export import convert_fp16
    from fmgs.trainer.engine.run import load_run
    from fmgs.export.ply import write_gaussian_ply
    from fmgs.export.trt import build_engine, resolve_trt

    def say(msg):
        if verbose:
            print(msg, flush=True)

    out = Path(out)
    if layout not in GRAPH_LAYOUTS:
        raise FmgsInputError(f"graph layout must be one of {', '.join(GRAPH_LAYOUTS)}, got {layout!r}")
    if os.path.lexists(out) and not overwrite:
        raise FmgsInputError("bundle folder already exists (use --overwrite to replace it)", out)
    check_bundle_replaceable(out, protect=[run_dir])   # before any work, and again at the swap
    use_trt, trt_note = resolve_trt(trt)
    if not use_trt and trt == "auto":
        say(f"note: {trt_note}")
    timings: dict[str, float] = {}
    t_all = t = time.perf_counter()
    # Baking, ONNX export and the checks run on the CPU whatever device and rasteriser the run
    # trained with (the checkpoint is device-free): a CUDA-trained run exports on any machine.
    run = load_run(run_dir, [*overrides, "train.backend=cpu", "train.device=cpu"], device="cpu")
    adapter = adapter_for(run.model)
    timings["load_s"] = time.perf_counter() - t
    say(f"fmgs-export: {run.kind} avatar, {run.model.num_surfels} surfels, iteration {run.iteration} <- {run_dir}")
    t = time.perf_counter()
    baked = adapter.bake(run, fold)
    timings["bake_s"] = time.perf_counter() - t

    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    with tempfile.TemporaryDirectory(prefix=staging_prefix(out, "stage"), dir=out.parent) as stage_s:
        stage = Path(stage_s)
        t = time.perf_counter()
        entries = adapter.export_models(run, baked, stage, skinning=skinning_model, layout=layout)
        timings["onnx_export_s"] = time.perf_counter() - t
        if "skinning" in entries and any(i["name"] == "prior_weights" for i in entries["skinning"]["inputs"]):
            baked.surfels["prior_skin_weights"] = run.model.skin_weights.detach().numpy().astype(np.float32)
        files = {e["file"]: stage / e["file"] for e in entries.values()}
        fp16_notes = None
        if fp16:
            t = time.perf_counter()
            try:
                for name, e in entries.items():
                    f16 = f"{name}.fp16.onnx"
                    convert_fp16(stage / e["file"], stage / f16)
                    e["fp16_file"] = f16
                    files[f16] = stage / f16
            except Exception as exc:  # converter missing or failing: keep the fp32 bundle
                fp16_notes = f"fp16 conversion failed ({exc.__class__.__name__}: {exc}); fp32 models only"
                say(f"note: {fp16_notes}")
                for e in entries.values():
                    e.pop("fp16_file", None)
                files = {k: v for k, v in files.items() if ".fp16." not in k}
            timings["fp16_convert_s"] = time.perf_counter() - t

        report: dict = {
            "run_dir": str(Path(run_dir).resolve()), "iteration": run.iteration, "kind": run.kind,
            "num_surfels": int(run.model.num_surfels), "models": sorted(entries),
            "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                         "python": platform.python_version()},
        }
        if check:
            t = time.perf_counter()
            report["parity"] = parity_check(run, baked, stage, entries, adapter.parity_frame, frames=parity_frames, threads=threads)
            timings["parity_s"] = time.perf_counter() - t
            if fp16 and fp16_notes is None:
                t1 = time.perf_counter()
                try:
                    report["parity_fp16"] = parity_check(run, baked, stage, entries, adapter.parity_frame, frames=parity_frames,
                                                         threads=threads, suffix=".fp16.onnx", tol=FP16_TOL)
                except Exception as exc:
                    report["parity_fp16"] = {"error": f"{exc.__class__.__name__}: {exc}"}
                timings["parity_fp16_s"] = time.perf_counter() - t1
            t1 = time.perf_counter()
            report["skinning_bake"] = adapter.skinning_check(run, baked, frames=bake_frames)
            timings["skinning_bake_s"] = time.perf_counter() - t1
            timings["checks_s"] = time.perf_counter() - t
        else:
            report["parity"] = None
            report["skinning_bake"] = None
        if fp16_notes:
            report["fp16_note"] = fp16_notes

        trt_info: dict = {"built": False, "mode": trt, "note": trt_note}
        if use_trt:
            t = time.perf_counter()
            try:
                import torch as _t

                trt_info["gpu"] = _t.cuda.get_device_name(0) if _t.cuda.is_available() else None
                S = int(run.model.num_surfels)
                for name, e in entries.items():
                    dyn = {i["name"]: tuple(i["shape"]) for i in e["inputs"] if "S" in i["shape"]}
                    for prec in (["fp32", "fp16"] if fp16 else ["fp32"]):
                        plan = f"{name}.{prec}.plan"
                        f16 = stage / e["fp16_file"] if e.get("fp16_file") else None
                        info = build_engine(stage / e["file"], stage / plan, S, dyn, fp16=prec == "fp16",
                                            fp16_onnx_path=f16)
                        e.setdefault("engines", {})[prec] = plan
                        files[plan] = stage / plan
                        trt_info.setdefault("engines", {}).setdefault(name, {})[prec] = info
                trt_info["built"] = True
            except Exception as exc:
                if trt == "on":
                    raise FmgsInputError(f"--trt on: engine build failed ({exc})") from exc
                trt_info["error"] = f"{exc.__class__.__name__}: {exc}"
                say(f"note: TensorRT engine build failed, bundle keeps the ONNX models only ({exc})")
                for e in entries.values():
                    e.pop("engines", None)
                files = {k: v for k, v in files.items() if not k.endswith(".plan")}
            timings["tensorrt_s"] = time.perf_counter() - t
        report["tensorrt"] = trt_info

        if ply:
            p = baked.ply
            write_gaussian_ply(stage / "avatar.ply", p["centers"], p["rotations"], p["scales"], p["opacities"],
                               p["colors"], sh_rest=ply_sh_rest)
            files["avatar.ply"] = stage / "avatar.ply"
        timings["total_before_write_s"] = time.perf_counter() - t_all
        report["timings"] = {k: round(v, 3) for k, v in timings.items()}
        (stage / "export_report.json").write_text(json.dumps(report, indent=2) + "\n")
        files["export_report.json"] = stage / "export_report.json"

        avatar = {"model_kind": run.kind, **run.model.bundle_info()}
        write_bundle(out, baked.surfels, kind=run.kind, body_model=baked.body_model, models=entries, files=files,
                     producer={"run_dir": str(Path(run_dir).resolve()), "iteration": run.iteration,
                               "torch": torch.__version__},
                     extra={"avatar": avatar}, overwrite=overwrite, protect=[run_dir])
    total = time.perf_counter() - t_all
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    report["timings"]["total_s"] = round(total, 3)
    report["bundle_bytes"] = int(size)
    if verbose:
        print_summary(report, out)
    par = report.get("parity")
    if par is not None and not par["passed"]:
        raise ExportCheckFailed(f"ONNX Runtime parity check failed: max abs error {par['max_abs_error']:.3g} >= "
                                f"{par['tolerance']:g} (see {out / 'export_report.json'})")
    return report


def print_summary(report: dict, out: Path) -> None:
    """Print the report's numbers (parity per model, skinning bake, timings, size)."""
    print(f"bundle: {out}  ({report['bundle_bytes'] / 1e6:.1f} MB, {report['timings']['total_s']:.1f} s)")
    for key in ("parity", "parity_fp16"):
        par = report.get(key)
        if not par or "models" not in par:
            continue
        print(f"{key} ({par['precision']}, {len(par['frames'])} training frames, tol {par['tolerance']:g}): "
              f"{'PASS' if par['passed'] else ('FAIL' if key == 'parity' else 'above tol (informational)')}, "
              f"max abs error {par['max_abs_error']:.2e}")
        for mname, outs in par["models"].items():
            print("   " + mname + ": " + ", ".join(f"{k} {v:.2e}" for k, v in outs.items()))
        e = par["end_to_end"]
        print(f"   end to end (ORT chain + NumPy LBS, baked W): colours {e['colors']:.2e}, centres "
              f"{e['means_mm']:.2e} mm")
    sb = report.get("skinning_bake")
    if sb and sb.get("applicable"):
        print(f"skinning bake over {sb['frames']} training poses (trained with skinning_query="
              f"{sb['skinning_query_trained']}; |mu'-mu| max {sb['max_residual_offset_mm']:.2f} mm):")
        for key, label in (("bake_error", "baked W vs trained forward"), ("canonical_vs_corrected", "W(mu) vs W(mu')")):
            e = sb[key]
            print(f"   {label}: max |dW| {e['max_weight_diff']:.2e} (p99 {e['p99_weight_diff']:.2e}), posed-centre "
                  f"displacement max {e['max_displacement_mm']:.4f} mm (p99 {e['p99_displacement_mm']:.4f}, "
                  f"mean {e['mean_displacement_mm']:.5f})")
        print(f"   {sb['note']}")
    elif sb:
        print(f"skinning bake: {sb['note']}")
    t = report["tensorrt"]
    print("tensorrt: " + ("engines built" if t.get("built") else t.get("error") or t.get("note", "")))
