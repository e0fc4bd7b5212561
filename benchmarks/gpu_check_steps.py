"""The steps of the GPU readiness check (``benchmarks/gpu_check.py``), one per process.

Usage (by gpu_check.py only): ``python benchmarks/gpu_check_steps.py STEP CTX.json RESULT.json``.
The orchestrator runs each step in its own process group under a time-box, so a hung
CUDA call or a slow compile cannot stop the others; a step writes its result
(``status`` passed/failed/skipped, ``reason``, ``headline``, ``numbers``, ``notes``)
atomically to RESULT.json as it goes, so a step killed by its time-box still reports
what it had measured.

Train, export and play go through the console scripts (entry points read from
pyproject.toml) and the existing benchmarks (bench_play.py), so the check follows the
project's public commands. The parity and hash-grid steps use the trainer's building
blocks directly (listed in docs/benchmarks.md, "GPU readiness check").

Thresholds are first guesses for float32 GPU kernels against the float32 CPU reference;
every number is reported whatever the verdict.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# the orchestrator puts the project on PYTHONPATH (symlink tree) when it is not installed;
# the checkout itself goes on sys.path only when neither is there
if __import__("importlib.util").util.find_spec("fmgs") is None:
    sys.path.insert(0, str(REPO))

from fmgs.atomic import write_json_atomic  # noqa: E402

#: Relative-error limits (||gpu - cpu|| / ||cpu||) of the parity step.
IMAGE_REL_TOL = 2e-2
GRAD_REL_TOL = 1e-1
#: Max abs difference of the tiny-cuda-nn encoding vs the PyTorch grid (table values ~U(-1, 1)).
TCNN_ABS_TOL = 1e-4
#: Max abs difference of the surfel table (colours in [0, 1], metres) ORT (CPU) vs TensorRT.
TRT_ABS_TOL = {"fp32": 1e-3, "fp16": 2e-2}
#: Toy sizes of the CPU rehearsal (--dry-run --rehearse).
REHEARSAL = {"iterations": 2, "image_size": 64, "play_size": 64, "play_frames": 4}


class Step:
    """Result being built; :meth:`save` writes it so a killed step still reports."""

    def __init__(self, ctx: dict, result_path: Path):
        self.ctx, self.path = ctx, result_path
        self.res = {"status": "passed", "reason": None, "headline": "", "numbers": {}, "notes": []}
        self.t0 = time.monotonic()

    def left(self) -> float:
        """Seconds left in this step's time-box (a little margin for writing the result)."""
        return float(self.ctx["time_box_s"]) - (time.monotonic() - self.t0) - 3.0

    def num(self, **kw) -> None:
        self.res["numbers"].update(kw)
        self.save()

    def note(self, text: str) -> None:
        self.res["notes"].append(text)
        self.save()

    def set(self, status: str | None = None, reason: str | None = None, headline: str | None = None) -> None:
        if status:
            self.res["status"] = status
        if reason is not None:
            self.res["reason"] = reason or None
        if headline is not None:
            self.res["headline"] = headline
        self.save()

    def save(self) -> None:
        write_json_atomic(self.path, self.res)


# ---------------------------------------------------------------------------- helpers
def run(cmd: list[str], timeout: float, cwd: Path | None = None) -> dict:
    """Run a sub-command (output echoed into the step log); ``rc`` None when it timed out."""
    t0 = time.monotonic()
    print("$ " + " ".join(map(str, cmd)), flush=True)
    try:
        p = subprocess.run(list(map(str, cmd)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           stdin=subprocess.DEVNULL, timeout=max(timeout, 1.0), cwd=cwd or Path.cwd())
        out = p.stdout.decode("utf-8", "replace")
        rc = p.returncode
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode("utf-8", "replace")
        rc = None
    text = "\n".join(line.split("\r")[-1] for line in out.splitlines())
    print(text, flush=True)
    return {"rc": rc, "out": text, "seconds": round(time.monotonic() - t0, 2)}


def cli(ctx: dict, script: str, *args) -> list[str]:
    """Command line of a console script through its pyproject entry point (no PATH needed)."""
    launcher = ("import importlib, sys; m, f = sys.argv[1].split(':'); sys.argv = sys.argv[2:]; "
                "sys.exit(getattr(importlib.import_module(m), f)())")
    return [ctx["python"], "-c", launcher, ctx["entry_points"][script], script, *map(str, args)]


def error_line(text: str) -> str:
    """The most telling line of a failed command's output (last error/exception line)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.search(r"(Error|error|Exception|FAIL|Traceback|refus|cannot|not found)", ln):
            return ln[:300]
    return lines[-1][:300] if lines else "no output"


def cuda_reason() -> str | None:
    """None when torch sees a CUDA device, else why not (one line)."""
    try:
        import torch
    except Exception as exc:
        return f"torch not importable ({exc.__class__.__name__}: {exc})"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build (no CUDA)"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device"
    return None


def gpu_skip_reason(ctx: dict) -> str | None:
    """Why the GPU half cannot run here (dry run or no device), else None."""
    why = cuda_reason()
    if ctx["dry"]:
        return "dry run" + (f": {why}" if why else "")
    return why


def gsplat_not_ready(ctx: dict) -> str | None:
    """Why gsplat must not be imported here: its build failed or timed out earlier.

    Importing gsplat without a finished build starts the whole nvcc JIT again (minutes),
    which would eat this step's time-box; a build step skipped by flag is no verdict.
    """
    st = (ctx["results"].get("gsplat_build") or {}).get("status")
    if st in ("failed", "timeout"):
        return f"gsplat's CUDA extension is not available (gsplat_build {st})"
    return None


def rel(a, b) -> float:
    """||b - a|| / ||a|| in float64 (a: the CPU reference)."""
    a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
    den = float(a64.norm())
    return float((b64 - a64).norm()) / den if den > 0 else float((b64 - a64).norm())


def data_overrides(ctx: dict, rehearse: bool = False) -> list[str]:
    """Config overrides for the data (staged subset split) and the run's size."""
    ov = []
    sp = ctx.get("split") or {}
    if sp:
        ov += [f"data.train_range=[{sp['train_range'][0]},{sp['train_range'][1]}]", "data.train_step=1",
               f"data.test_range=[{sp['test_range'][0]},{sp['test_range'][1]}]", "data.test_step=1"]
    if rehearse:
        # a handful of frames: the rehearsal checks plumbing, not quality
        ov = [o for o in ov if not o.startswith(("data.train_range", "data.test_range"))]
        if sp:
            ov += [f"data.train_range=[0,{min(4, sp['train_range'][1])}]",
                   f"data.test_range=[{sp['test_range'][0]},{sp['test_range'][0] + 2}]"]
        else:
            ov += ["data.train_range=[0,20]", "data.train_step=5", "data.test_range=[455,465]", "data.test_step=5"]
    return ov


def motion_path(ctx: dict) -> Path:
    return Path(ctx["data_root"]) / "motion" / "smpl72_sequences" / "walking.npy"


def earlier(ctx: dict, step: str, key: str):
    return ((ctx["results"].get(step) or {}).get("numbers") or {}).get(key)


# ---------------------------------------------------------------------------- env
def step_env(s: Step) -> None:
    """Versions, the GPU line of nvidia-smi, nvcc; always passes (it only reports)."""
    import platform
    import shutil

    env = {"python": platform.python_version(), "cpu_count": os.cpu_count(), "platform": platform.platform()}
    smi = shutil.which("nvidia-smi") or next((p for p in ("/usr/local/nvidia/bin/nvidia-smi", "/usr/bin/nvidia-smi")
                                              if Path(p).is_file()), None)
    if smi:
        r = run([smi, "--query-gpu=name,driver_version,memory.total,compute_cap", "--format=csv,noheader"], 20)
        env["nvidia_smi"] = r["out"].strip().splitlines()[0] if r["rc"] == 0 and r["out"].strip() else \
            f"nvidia-smi failed: {error_line(r['out'])}"
    nvcc = shutil.which("nvcc") or (Path("/usr/local/cuda/bin/nvcc") if Path("/usr/local/cuda/bin/nvcc").exists() else None)
    if nvcc:
        r = run([nvcc, "--version"], 20)
        env["nvcc"] = (re.findall(r"release [\d.]+", r["out"]) or ["?"])[0]
    v = {}
    try:
        import torch

        v["torch"] = f"{torch.__version__} (CUDA {torch.version.cuda})"
        if torch.cuda.is_available():
            env["torch_device"] = torch.cuda.get_device_name(0)
            env["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    except Exception as exc:
        v["torch"] = f"not importable ({exc.__class__.__name__})"
    from importlib import metadata

    for dist in ("gsplat", "onnxruntime", "onnxruntime-gpu", "tensorrt", "tensorrt-cu13", "tensorrt-cu12",
                 "tinycudann", "numba", "numpy", "moderngl"):
        try:
            v[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    cupys = [d for d in metadata.distributions() if (d.metadata["Name"] or "").lower().startswith("cupy")]
    for d in cupys:
        v[d.metadata["Name"]] = d.version
    try:
        import onnxruntime as ort

        env["ort_providers"] = ort.get_available_providers()
    except Exception as exc:
        env["ort_providers"] = f"onnxruntime not importable ({exc.__class__.__name__})"
    from fmgs.runtime.xp import cupy_status

    env["cupy_status"] = cupy_status()[1]
    env["versions"] = v
    s.num(**env)
    s.set("passed", headline=env.get("nvidia_smi") or "no NVIDIA GPU (nvidia-smi not found)")


# ---------------------------------------------------------------------------- gsplat build
def step_gsplat_build(s: Step) -> None:
    """Import gsplat and build its CUDA extension (JIT with nvcc), timing the build."""
    why = gpu_skip_reason(s.ctx)
    try:
        import gsplat

        s.num(gsplat=gsplat.__version__)
    except Exception as exc:
        s.set("skipped" if why else "failed", f"gsplat not importable ({exc.__class__.__name__}: {exc})"
              + (f"; {why}" if why else ""))
        return
    if why:
        s.set("skipped", f"{why}: gsplat {gsplat.__version__} imports, its CUDA extension is not built")
        return
    import torch

    cap = ".".join(map(str, torch.cuda.get_device_capability(0)))
    # build for this card only, on every core: several times faster than gsplat's defaults
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", cap)
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    s.num(arch_list=os.environ["TORCH_CUDA_ARCH_LIST"], max_jobs=os.environ["MAX_JOBS"])
    s.set(reason="compiling gsplat's CUDA extension (nvcc)")
    t0 = time.perf_counter()
    from gsplat.cuda._backend import _C

    secs = time.perf_counter() - t0
    s.num(build_or_load_s=round(secs, 1))
    if _C is None:
        s.set("failed", "gsplat's CUDA extension did not build (nvcc missing or compile error: see the log)")
        return
    s.set("passed", "", f"gsplat {gsplat.__version__} CUDA extension ready in {secs:.0f} s (arch {cap})")


# ---------------------------------------------------------------------------- raster parity
def _posed_frame(ctx: dict, size: int):
    """Real posed 377 surfels of the first training frame (initial foundation model) and its camera."""
    import numpy as np
    import torch

    from fmgs.config import load_config
    from fmgs.trainer.data.humannerf import HumanNeRFSequence
    from fmgs.trainer.engine.run import build_model, build_setup
    from fmgs.trainer.models.base import frame_bone_transforms

    cfg = load_config(None, data_overrides(ctx) + [f"data.image_size={size}"])
    d = cfg.data
    seq = HumanNeRFSequence(d.root, frames=[int(d.train_range[0])], image_size=int(d.image_size),
                            background=tuple(d.background), undistort=bool(d.undistort), smpl_path=d.smpl_path)
    setup = build_setup(cfg, seq)
    torch.manual_seed(0)
    model = build_model(cfg, setup)
    fr = seq[0]
    B = frame_bone_transforms(setup.smpl, setup.rest_joints, setup.canonical_G, fr.poses, fr.world_from_body)
    with torch.no_grad():
        ps = model(torch.as_tensor(B, dtype=torch.float32), torch.as_tensor(fr.camera.center, dtype=torch.float32))
    cam = fr.camera
    f32 = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
    scene = {k: getattr(ps, k).detach().clone() for k in ("means", "rotations", "scales", "opacities", "colors")}
    return scene, f32(cam.K), f32(cam.viewmat), int(cam.width), int(cam.height), fr.name


def _render_and_grad(scene: dict, K, V, W: int, H: int, backend: str, device: str, weights: dict):
    """Render on ``backend`` and back-propagate a fixed random weighting of rgb, alpha and normal.

    Depth is left out of the loss: gsplat uses the surfel centre depth per fragment where
    the CPU back-end uses the ray-plane intersection (documented in fmgs.trainer.render.gsplat).
    """
    from fmgs.trainer.render.dispatch import rasterize_surfels

    leaves = {k: v.to(device).clone().requires_grad_(True) for k, v in scene.items()}
    out = rasterize_surfels(leaves["means"], leaves["rotations"], leaves["scales"], leaves["opacities"],
                            leaves["colors"], K.to(device), V.to(device), W, H, backend=backend)
    loss = sum((getattr(out, k) * w.to(device)).sum() for k, w in weights.items())
    loss.backward()
    grads = {k: v.grad.detach().cpu() for k, v in leaves.items()}
    # rotations: compare the tangent-space part (skew(R^T G)); the off-manifold part of a 3x3
    # gradient depends on the parametrisation (gsplat goes through quaternions)
    R = leaves["rotations"].detach().cpu()
    RtG = R.transpose(1, 2) @ grads["rotations"]
    grads["rotations_tangent"] = RtG - RtG.transpose(1, 2)
    imgs = {k: getattr(out, k).detach().cpu() for k in ("rgb", "alpha", "normal", "depth")}
    return imgs, grads


def step_raster_parity(s: Step) -> None:
    """gsplat's rasterization_2dgs vs the CPU rasteriser on real posed 377 surfels."""
    import torch

    ctx = s.ctx
    why = gpu_skip_reason(ctx) or gsplat_not_ready(ctx)
    size = 128 if why else int(ctx["image_size"])
    t0 = time.perf_counter()
    scene, K, V, W, H, name = _posed_frame(ctx, size)
    s.num(frame=name, surfels_total=int(scene["means"].shape[0]), setup_s=round(time.perf_counter() - t0, 1))
    if why:
        # CPU half only, on a subset: proves the reference path and this step's plumbing
        g = torch.Generator().manual_seed(0)
        idx = torch.randperm(scene["means"].shape[0], generator=g)[:2000]
        scene = {k: v[idx] for k, v in scene.items()}
    g = torch.Generator().manual_seed(1)
    weights = {k: torch.rand(*shape, generator=g) for k, shape in
               (("rgb", (H, W, 3)), ("alpha", (H, W)), ("normal", (H, W, 3)))}
    t0 = time.perf_counter()
    cpu_img, cpu_grad = _render_and_grad(scene, K, V, W, H, "cpu", "cpu", weights)
    cpu_s = time.perf_counter() - t0
    finite = all(bool(torch.isfinite(t).all()) for t in [*cpu_img.values(), *cpu_grad.values()])
    cover = float((cpu_img["alpha"] > 0.5).float().mean())
    s.num(surfels=int(scene["means"].shape[0]), size=f"{W}x{H}", cpu_fwd_bwd_s=round(cpu_s, 3),
          cpu_finite=finite, cpu_coverage=round(cover, 4))
    if not finite:
        s.set("failed", "CPU reference produced non-finite images or gradients")
        return
    if why and not ctx["rehearse"]:
        s.set("skipped", f"gsplat half: {why}",
              f"CPU reference ok ({scene['means'].shape[0]} surfels, {W}x{H}, {cpu_s:.2f} s fwd+bwd)")
        return
    # the rehearsal runs the GPU half's code with the CPU back-end standing in for gsplat
    backend, dev = ("cpu", "cpu") if why else ("gsplat", "cuda")
    if not why:
        from fmgs.trainer.render.dispatch import resolve_backend

        try:
            resolve_backend("gsplat")
        except RuntimeError as exc:
            s.set("failed", str(exc))
            return
    gs_img, gs_grad = _render_and_grad(scene, K, V, W, H, backend, dev, weights)
    img_err = {k: rel(cpu_img[k], gs_img[k]) for k in ("rgb", "alpha", "normal")}
    both = (cpu_img["alpha"] > 0.5) & (gs_img["alpha"] > 0.5)
    depth_mae = float((cpu_img["depth"] - gs_img["depth"]).abs()[both].mean()) if bool(both.any()) else float("nan")
    grad_err = {k: rel(cpu_grad[k], gs_grad[k]) for k in ("means", "scales", "opacities", "colors",
                                                            "rotations_tangent", "rotations")}
    s.num(image_rel_error={k: round(v, 6) for k, v in img_err.items()}, depth_mae_m=round(depth_mae, 5),
          grad_rel_error={k: round(v, 5) for k, v in grad_err.items()},
          thresholds={"image": IMAGE_REL_TOL, "grad": GRAD_REL_TOL})
    # timings (median of 10 after a warm-up, synchronised)
    from fmgs.trainer.render.dispatch import rasterize_surfels

    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    on = {k: v.to(dev) for k, v in scene.items()}
    Kd, Vd = K.to(dev), V.to(dev)

    def fwd():
        with torch.no_grad():
            rasterize_surfels(on["means"], on["rotations"], on["scales"], on["opacities"], on["colors"],
                              Kd, Vd, W, H, backend=backend)

    def med(fn, n=10):
        fn()
        sync()
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t)
        return sorted(ts)[n // 2]

    t_f = med(fwd, 3 if why else 10)
    t_fb = med(lambda: _render_and_grad(scene, K, V, W, H, backend, dev, weights), 3 if why else 10)
    s.num(**{f"{backend}_fwd_ms": round(1e3 * t_f, 3), f"{backend}_fwd_bwd_ms_incl_transfers": round(1e3 * t_fb, 2)})
    bad = [f"{k} {v:.2g}" for k, v in img_err.items() if not v < IMAGE_REL_TOL]
    bad += [f"grad {k} {v:.2g}" for k, v in grad_err.items() if k != "rotations" and not v < GRAD_REL_TOL]
    head = (f"{scene['means'].shape[0]} surfels {W}x{H}: rgb rel {img_err['rgb']:.1e}, grad means rel "
            f"{grad_err['means']:.1e}; fwd {1e3 * t_f:.2f} ms")
    if why:
        s.set("skipped", f"gsplat half: {why}", "CPU rehearsal (CPU back-end standing in for gsplat): " + head)
        return
    s.set("failed" if bad else "passed", ("over threshold: " + ", ".join(bad)) if bad else "", head)


# ---------------------------------------------------------------------------- train
def _parse_s_per_it(text: str) -> float | None:
    m = re.findall(r"\(([\d.]+) s/it this session\)", text)
    return float(m[-1]) if m else None


def _eval_psnr(ctx: dict, s: Step, run_dir: Path, max_frames: int, key: str) -> None:
    r = run(cli(ctx, "fmgs-eval", run_dir, "--no-video", "--max-frames", max_frames), max(s.left(), 5))
    mpath = run_dir / "eval" / "metrics.json"
    if r["rc"] == 0 and mpath.is_file():
        m = json.loads(mpath.read_text())
        s.num(**{f"{key}_heldout_psnr_db": m.get("psnr"), f"{key}_heldout_frames": max_frames,
                 f"{key}_eval_s": r["seconds"]})
    else:
        s.note(f"fmgs-eval on {run_dir.name}: exit {r['rc']}: {error_line(r['out'])}")


def step_train(s: Step) -> None:
    """``fmgs-train`` with backend=gsplat, then ``fmgs-eval``; a short CPU run stands in on failure."""
    ctx = s.ctx
    work = Path(ctx["work"])
    why = gpu_skip_reason(ctx)
    its, size = int(ctx["iterations"]), int(ctx["image_size"])
    gs_cmd = ["--out", work / "run_gsplat", "--no-eval", f"train.iterations={its}", "train.backend=gsplat",
              "train.device=cuda", f"data.image_size={size}", "train.image_every=0", *data_overrides(ctx)]
    s.num(command="fmgs-train " + " ".join(map(str, gs_cmd)))
    if why and not ctx["rehearse"]:
        s.set("skipped", f"{why}: a {its}-iteration backend=gsplat run needs CUDA + gsplat")
        return
    if not why and gsplat_not_ready(ctx):
        s.set("failed", f"{gsplat_not_ready(ctx)}: no backend=gsplat run")
        _cpu_fallback_run(ctx, s, work)
        return
    if why:  # CPU rehearsal of the same plumbing at toy size
        reh = work / "run_rehearsal"
        r = run(cli(ctx, "fmgs-train", "--out", reh, "--no-eval", f"train.iterations={REHEARSAL['iterations']}",
                    "train.backend=cpu", "train.device=cpu", f"data.image_size={REHEARSAL['image_size']}",
                    "train.image_every=0",
                    "train.checkpoint_every=0", *data_overrides(ctx, rehearse=True)), max(s.left() - 20, 5))
        if r["rc"] != 0:
            s.set("failed", f"CPU rehearsal: fmgs-train exit {r['rc']}: {error_line(r['out'])}")
            return
        s.num(run_dir=str(reh), rehearsal_s_per_it=_parse_s_per_it(r["out"]), rehearsal_train_s=r["seconds"])
        _eval_psnr(ctx, s, reh, 1, "rehearsal")
        s.set("skipped", f"gsplat run: {why}",
              f"CPU rehearsal ok ({REHEARSAL['iterations']} it at {REHEARSAL['image_size']} px)")
        return
    s.set(reason=f"training {its} iterations with backend=gsplat")
    run_dir = work / "run_gsplat"
    r = run(cli(ctx, "fmgs-train", *gs_cmd), max(s.left() - 75, 10))
    s.num(train_wall_s=r["seconds"])
    dev = re.search(r"iterations on (\S+) \((\w+) rasteriser\)", r["out"])
    if dev:  # what fmgs-train says it trained on
        s.num(train_device=dev.group(1), train_rasteriser=dev.group(2))
    if r["rc"] == 0:
        spi = _parse_s_per_it(r["out"])
        s.num(run_dir=str(run_dir), s_per_iteration=spi)
        _eval_psnr(ctx, s, run_dir, 23, "gsplat")
        p = s.res["numbers"].get("gsplat_heldout_psnr_db")
        s.set("passed" if p else "failed", "" if p else "held-out evaluation failed",
              f"{its} it: {spi} s/it, held-out PSNR {p if p is None else round(p, 2)} dB")
        return
    msg = "timed out" if r["rc"] is None else f"exit {r['rc']}: {error_line(r['out'])}"
    s.set("failed", f"fmgs-train backend=gsplat {msg}")
    _cpu_fallback_run(ctx, s, work)


def _cpu_fallback_run(ctx: dict, s: Step, work: Path) -> None:
    """A short CPU run so that export and play still have something to work on."""
    fb = work / "run_cpu_fallback"
    r2 = run(cli(ctx, "fmgs-train", "--out", fb, "--no-eval", "train.iterations=10", "train.backend=cpu",
                 "train.device=cpu", "data.image_size=256", "train.image_every=0", *data_overrides(ctx)),
             max(s.left(), 5))
    if r2["rc"] == 0:
        s.num(run_dir=str(fb), fallback="10-iteration CPU run at 256 px (for export/play only)",
              fallback_s_per_iteration=_parse_s_per_it(r2["out"]))
    else:
        s.note(f"CPU fallback run failed too: {error_line(r2['out'])}")


# ---------------------------------------------------------------------------- tcnn
def step_tcnn(s: Step) -> None:
    """The project's tiny-cuda-nn hash grid vs the PyTorch grid, same table, same points."""
    import torch

    from fmgs.trainer.models import hashgrid as hg

    tcnn_cls = getattr(hg, "TcnnHashGrid", None)
    cfg = hg.HashGridConfig()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1 << 16, 3, generator=g)
    ref = hg.HashGrid(cfg)
    with torch.no_grad():
        ref.table.uniform_(-1.0, 1.0, generator=g)
        t = time.perf_counter()
        y = ref(x)
        cpu_ms = 1e3 * (time.perf_counter() - t)
    s.num(points=int(x.shape[0]), output_dim=int(y.shape[1]), torch_grid_cpu_ms=round(cpu_ms, 2),
          torch_grid_finite=bool(torch.isfinite(y).all()))
    if tcnn_cls is None:
        s.set("skipped", "not available: fmgs.trainer.models.hashgrid has no TcnnHashGrid")
        return
    why = gpu_skip_reason(s.ctx)
    try:
        import tinycudann  # noqa: F401
    except Exception as exc:
        s.set("skipped", f"not available: tinycudann not importable ({exc.__class__.__name__}: {exc}); "
                         "PyPI has no tinycudann wheel" + (f"; {why}" if why else ""),
              "PyTorch grid ok on the CPU")
        return
    if why:
        s.set("skipped", why)
        return
    enc = tcnn_cls(cfg).cuda()
    params = list(enc.parameters())
    flat = ref.table.detach().reshape(-1)
    if len(params) != 1 or params[0].numel() != flat.numel():
        s.set("failed", f"tcnn parameters {[p.numel() for p in params]} do not match the table ({flat.numel()})")
        return
    with torch.no_grad():
        params[0].copy_(flat.to(params[0].dtype).cuda())
    xc = x.cuda()
    refc = ref.cuda()
    yt = enc(xc)
    yr = refc(xc)
    err = float((yt.double() - yr.double()).abs().max())
    w = torch.rand(yr.shape, generator=g).cuda()
    (yt * w).sum().backward()
    (yr * w).sum().backward()
    gerr = rel(refc.table.grad.reshape(-1), params[0].grad.reshape(-1).float())
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        enc(xc)
    torch.cuda.synchronize()
    tc_ms = 1e2 * (time.perf_counter() - t)
    s.num(max_abs_error=err, table_grad_rel_error=gerr, tcnn_forward_ms=round(tc_ms, 3), tolerance=TCNN_ABS_TOL)
    ok = err < TCNN_ABS_TOL
    s.set("passed" if ok else "failed", None if ok else f"max error {err:.2e} over {TCNN_ABS_TOL:g}",
          f"max |tcnn - torch| {err:.1e}, table grad rel {gerr:.1e}")


# ---------------------------------------------------------------------------- export
def _ort_vs_trt(bundle: Path, motion: Path, s: Step) -> None:
    """Surfel-table difference, ONNX Runtime on the CPU vs TensorRT engines, on 5 motion frames."""
    import numpy as np

    from fmgs.motion import load_motion
    from fmgs.runtime.pipeline import AvatarPipeline
    from fmgs.runtime.xp import to_numpy

    mo = load_motion(str(motion), fps=30.0, source_fps=30.0)
    frames = [int(i) for i in np.linspace(0, mo.num_frames - 1, 5)]
    ref = AvatarPipeline(bundle, array_backend="numpy", inference_backend="onnxruntime", providers="cpu")
    cands = {"tensorrt": dict(array_backend="cupy", inference_backend="tensorrt"),
             "ort_cuda": dict(array_backend="numpy", inference_backend="onnxruntime", providers="cuda")}
    out = {}
    for name, kw in cands.items():
        try:
            p = AvatarPipeline(bundle, **kw)
        except Exception as exc:
            out[name] = f"not run ({exc.__class__.__name__}: {str(exc)[:160]})"
            continue
        errs = []
        for i in frames:
            wfb = mo.world_from_body(i)
            eye = np.asarray(wfb)[:3, 3] + np.array([0.0, 0.0, 3.0])
            a = np.array(to_numpy(ref.frame(mo.poses[i], wfb, eye)))
            b = np.array(to_numpy(p.frame(mo.poses[i], wfb, eye)))
            errs.append(float(np.abs(a - b).max()))
        out[name] = {"max_abs_table_error": max(errs), "describe": p.describe(),
                     "cuda_preload": sorted({str(getattr(m, "preload", None)) for m in p.models.values()})}
    s.num(runtime_vs_ort_cpu=out)


def step_export(s: Step) -> None:
    """``fmgs-export --trt on --fp16`` of the training run; ORT-vs-TensorRT error of the engines."""
    ctx = s.ctx
    run_dir = earlier(ctx, "train", "run_dir")
    why = gpu_skip_reason(ctx)
    if not run_dir:
        s.set("skipped", f"no training run to export (train step {ctx['results'].get('train', {}).get('status')})"
              + (f"; {why}" if why else ""))
        return
    work = Path(ctx["work"])
    bundle = work / "bundle"
    trt_mode = "auto" if why else "on"
    r = run(cli(ctx, "fmgs-export", run_dir, "--out", bundle, "--overwrite", "--trt", trt_mode, "--fp16",
                "--parity-frames", 2, "--bake-frames", 8, "--threads", min(os.cpu_count() or 2, 8)),
            max(s.left() - 40, 10))
    s.num(export_s=r["seconds"], trt_mode=trt_mode)
    if r["rc"] != 0:
        s.set("failed", f"fmgs-export --trt {trt_mode} exit {r['rc']}: {error_line(r['out'])}")
        if trt_mode == "on":
            r2 = run(cli(ctx, "fmgs-export", run_dir, "--out", bundle, "--overwrite", "--trt", "off",
                         "--parity-frames", 1, "--bake-frames", 4), max(s.left() - 20, 5))
            if r2["rc"] == 0:
                s.num(bundle=str(bundle), fallback="bundle exported with --trt off (for the play step)")
            else:
                s.note(f"--trt off export failed too: {error_line(r2['out'])}")
        return
    s.num(bundle=str(bundle))
    rep = json.loads((bundle / "export_report.json").read_text())
    par = rep.get("parity") or {}
    trt = rep.get("tensorrt") or {}
    eng = {n: {p: e.get("seconds") for p, e in v.items()} for n, v in (trt.get("engines") or {}).items()}
    s.num(ort_parity_max_abs=par.get("max_abs_error"), ort_parity_passed=par.get("passed"),
          trt_built=trt.get("built"), trt_note=trt.get("note") or trt.get("error"), engine_build_s=eng)
    if s.left() > 10:
        try:
            _ort_vs_trt(bundle, motion_path(ctx), s)
        except Exception as exc:
            s.note(f"ORT-vs-TensorRT comparison failed: {exc.__class__.__name__}: {exc}")
    if why:
        s.set("skipped", f"TensorRT half: {why}", f"CPU rehearsal: bundle exported ({trt.get('note')})")
        return
    cmp_ = s.res["numbers"].get("runtime_vs_ort_cpu", {}).get("tensorrt")
    err = cmp_.get("max_abs_table_error") if isinstance(cmp_, dict) else None
    ok = bool(trt.get("built")) and err is not None and err < TRT_ABS_TOL["fp32"]
    s.set("passed" if ok else "failed", None if ok else f"TensorRT engines built={trt.get('built')}, "
          f"ORT-vs-TRT error {err}", f"engines {sorted(eng)}; ORT-vs-TRT max |table diff| {err}")


# ---------------------------------------------------------------------------- play
def _runtime_probes() -> dict:
    """The runtime's own GPU probes (torch-free): CuPy, TensorRT, ORT providers, GL context."""
    from fmgs.runtime.inference import ort_providers, tensorrt_status
    from fmgs.runtime.xp import cupy_status

    pr = {"cupy": cupy_status()[1], "tensorrt": tensorrt_status()[1], "ort_providers_auto": ort_providers("auto")}
    try:
        from fmgs.runtime.gl_renderer import create_headless_context, is_software_renderer

        ctx = create_headless_context()
        pr["gl"] = f"{ctx.info.get('GL_RENDERER')} ({'software' if is_software_renderer(ctx) else 'hardware'})"
        pr["gl_hardware"] = not is_software_renderer(ctx)
        ctx.release()
    except Exception as exc:
        pr["gl"] = f"no headless OpenGL ({str(exc)[:200]})"
        pr["gl_hardware"] = False
    return pr


def _parity_cpu_vs_gpu(bundle: Path, motion: Path, size: int, gpu: dict, frames=(0, 40, 80)) -> dict:
    """PSNR / max abs difference between the GPU configuration's frames and the all-CPU path's."""
    import numpy as np

    from fmgs.motion import load_motion
    from fmgs.runtime.app import Player
    from fmgs.runtime.gl_renderer import create_headless_context
    from fmgs.runtime.pipeline import AvatarPipeline

    mo = load_motion(str(motion), fps=30.0, source_fps=30.0)
    cpu = Player(AvatarPipeline(bundle, array_backend="numpy", inference_backend="onnxruntime", providers="cpu"),
                 mo, None, size, size, renderer="cpu")
    glctx = create_headless_context() if gpu["renderer"] == "gl" else None
    gp = Player(AvatarPipeline(bundle, array_backend=gpu["arrays"], inference_backend="auto", providers="auto"),
                mo, glctx, size, size, renderer=gpu["renderer"])
    psnrs, maxd = [], []
    for i in frames:
        a = cpu.render(i).astype(np.float64) / 255.0
        b = gp.render(i).astype(np.float64) / 255.0
        mse = float(np.mean((a - b) ** 2))
        psnrs.append(99.0 if mse == 0 else 10 * math.log10(1.0 / mse))
        maxd.append(float(np.abs(a - b).max()))
    return {"frames": list(frames), "psnr_db_min": round(min(psnrs), 2), "psnr_db_mean": round(float(np.mean(psnrs)), 2),
            "max_abs_diff": round(max(maxd), 4), "gpu_path": gp.pipeline.describe(), "renderer": gp.renderer.kind}


def step_play(s: Step) -> None:
    """fmgs-play headless at 1024^2 on the GPU path, bench_play FPS + split, parity with the CPU path."""
    ctx = s.ctx
    work = Path(ctx["work"])
    why = gpu_skip_reason(ctx)
    probes = _runtime_probes()
    s.num(probes=probes)
    bundle = earlier(ctx, "export", "bundle")
    motion = motion_path(ctx)
    if why and not ctx["rehearse"]:
        s.set("skipped", f"{why}; runtime probes: CuPy: {probes['cupy']}; TensorRT: {probes['tensorrt']}")
        return
    if not bundle:
        s.set("skipped", f"no bundle (export step {ctx['results'].get('export', {}).get('status')})")
        return
    size = REHEARSAL["play_size"] if why else int(ctx["play_size"])
    nfr = REHEARSAL["play_frames"] if why else int(ctx["play_frames"])
    gpu = {"arrays": "numpy" if why else "cupy", "renderer": "gl" if probes.get("gl_hardware") else "cpu"}
    if not why and gpu["renderer"] == "cpu":
        s.note(f"no hardware OpenGL context ({probes['gl']}): the draw stage runs on the numba CPU renderer")
    r = run(cli(ctx, "fmgs-play", bundle, motion, "--headless", "--out", work / "play_frames/", "--size", size,
                "--frames", min(nfr, 30), "--arrays", gpu["arrays"], "--renderer", gpu["renderer"]),
            max(min(s.left() / 3, 120), 10))
    s.num(fmgs_play_rc=r["rc"], fmgs_play_stats=[ln for ln in r["out"].splitlines()
                                                  if re.search(r"FPS|frame time|split|fmgs-play: .*bundle", ln)][:5])
    if r["rc"] != 0:
        s.note(f"fmgs-play exit {r['rc']}: {error_line(r['out'])}")
    bj = work / "bench_play.json"
    # NumPy arrays as a second try: one CuPy bug must not hide the frame rate of the rest
    tries = [gpu["arrays"]] + (["numpy"] if gpu["arrays"] != "numpy" else [])
    for k, arrays in enumerate(tries):
        cmd = [ctx["python"], REPO / "benchmarks" / "bench_play.py", bundle, motion, "--size", size, "--frames", nfr,
               "--warmup", 5 if why else 10, "--arrays", arrays, "--inference", "auto", "--providers",
               "cpu" if why else "auto", "--renderer", gpu["renderer"], "--isolate", 3 if why else 10, "--json", bj]
        bj.unlink(missing_ok=True)
        rb = run(cmd, max(min(s.left() - 30, 200 if k == 0 else 100), 10))
        if rb["rc"] == 0 and bj.is_file():
            b = json.loads(bj.read_text())
            iso = b.get("isolated") or {}
            s.num(fps=round(b["fps"], 1), mean_ms=round(b["mean_ms"], 2), p95_ms=round(b["p95_ms"], 2),
                  split_ms={k: round(v, 2) for k, v in b["split_ms"].items()}, describe=b.get("describe"),
                  renderer=b.get("renderer"), size=size, arrays=arrays,
                  isolated_ms={k: round(v["wall_ms"], 2) for k, v in iso.items() if isinstance(v, dict)})
            break
        s.note(f"bench_play --arrays {arrays} exit {rb['rc']}: {error_line(rb['out'])}")
        if s.left() < 40:
            break
    for arrays in tries:
        if s.left() < 15:
            break
        try:
            s.num(parity_vs_cpu_path=_parity_cpu_vs_gpu(bundle, motion, size, dict(gpu, arrays=arrays)))
            break
        except Exception as exc:
            s.note(f"parity with the CPU path (arrays {arrays}) failed: {exc.__class__.__name__}: {str(exc)[:200]}")
    n = s.res["numbers"]
    par = n.get("parity_vs_cpu_path") or {}
    head = (f"{n.get('fps')} FPS at {size}^2 ({n.get('renderer')} renderer, arrays {n.get('arrays')}); "
            f"parity vs CPU path min PSNR {par.get('psnr_db_min')} dB")
    if why:
        s.set("skipped", f"GPU half: {why}", "CPU rehearsal: " + head)
        return
    ok = (r["rc"] == 0 and n.get("arrays") == gpu["arrays"] and n.get("fps") is not None
          and (par.get("psnr_db_min") or 0) > 35.0)
    why_not = next((n for n in s.res["notes"] if "exit" in n or "failed" in n), "see notes")
    s.set("passed" if ok else "failed", None if ok else why_not, head)


STEP_FUNCS = {"env": step_env, "gsplat_build": step_gsplat_build, "raster_parity": step_raster_parity,
              "train": step_train, "tcnn": step_tcnn, "export": step_export, "play": step_play}


def main(argv: list[str]) -> int:
    """Run one step; the result file is always written (exceptions become a failed result)."""
    name, ctx_path, res_path = argv[0], Path(argv[1]), Path(argv[2])
    ctx = json.loads(ctx_path.read_text())
    s = Step(ctx, res_path)
    s.save()
    try:
        STEP_FUNCS[name](s)
    except Exception as exc:
        traceback.print_exc()
        s.set("failed", f"{exc.__class__.__name__}: {str(exc)[:300]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
