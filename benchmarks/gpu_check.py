"""GPU readiness check: every CUDA path of fmgs-avatar in one short, time-boxed run.

Run through ``benchmarks/gpu_check.sh`` (same arguments). Two sub-commands:

``stage`` (on a CPU machine with the data and a package registry, before a GPU run)
    writes ``.gpucheck/`` (ignored by git; name it in the device tool's ``carry``): a
    frame subset of ZJU-MoCap 377 (every 5th training frame and the 23 held-out frames;
    the GPU machine cannot see ``../shared``), the SMPL files, one motion clip, the wheels
    the GPU image lacks (gsplat and the project's small pure-Python dependencies) and,
    when ``apt-get`` works, the GL loader packages for EGL. It refuses to exceed
    ``--max-mib`` (the device tool carries 64 MiB with the repository).

``run`` (the default) on the GPU machine, in this order, each step in its own process
group under ``timeout`` with a share of ``--budget`` seconds, a failure recorded and the
rest still run:

==============  ==========================================================================
env             nvidia-smi line, Python, versions of torch/CUDA, gsplat, CuPy, ORT, TensorRT
install         what is missing: carried wheels first, PyPI only if it answers; the project
                itself through a symlink tree (no build); EGL loaders from carried .debs
gsplat_build    gsplat's CUDA extension (JIT-compiled by nvcc on first import), timed
raster_parity   ``rasterization_2dgs`` vs the CPU rasteriser on real posed 377 surfels:
                relative error of every image and of the gradients; timings
train           ``fmgs-train train.backend=gsplat`` (300 iterations) + ``fmgs-eval``:
                held-out PSNR, s/iteration; a short CPU run stands in when it fails
tcnn            ``TcnnHashGrid`` (tiny-cuda-nn) vs the PyTorch grid (max error)
export          ``fmgs-export --trt on``: engines built, ORT-vs-TensorRT error of a frame
play            ``fmgs-play`` headless at 1024^2 with CuPy + TensorRT/CUDA providers,
                ``bench_play.py`` FPS and stage split, parity with the CPU path
==============  ==========================================================================

then writes ``gpu_check.json``, ``gpu_check.md`` (paste into docs/benchmarks.md) and
``gpu_check.log`` (every step's output) into ``--out`` (default ``$OUT``, else
``gpu_check_out``). ``--dry-run`` installs nothing, touches no network and runs only the
CPU halves (each GPU half is skipped with the reason the project's own probes give);
``--rehearse`` (with ``--dry-run``) also runs train/export/play on the CPU at toy sizes to
exercise their plumbing.

Exit code: 0 when the report was written (whatever the steps did), 2 on bad arguments.
"""
from __future__ import annotations

import argparse
import collections
import datetime as _dt
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # fmgs/ (torch-free, stdlib-only atomic writes) without an install

from fmgs.atomic import atomic_path, write_json_atomic  # noqa: E402

#: Steps of ``run`` in execution order (the issue's 1-4, preceded by env/install/build).
STEPS = ("env", "install", "gsplat_build", "raster_parity", "train", "tcnn", "export", "play")
#: Longest each step may take (seconds); the run's budget may cut it shorter.
DEFAULT_TIMEOUTS = {"env": 30, "install": 150, "gsplat_build": 300, "raster_parity": 90, "train": 180,
                    "tcnn": 45, "export": 120, "play": 150}
#: Seconds kept for each later step when an earlier one is given its time-box, so that a
#: slow compile cannot starve the rest (the report's own time comes on top).
RESERVE = {"env": 5, "install": 20, "gsplat_build": 30, "raster_parity": 25, "train": 40, "tcnn": 10,
           "export": 40, "play": 45}
REPORT_RESERVE_S = 8.0
STAGE_DIR = ".gpucheck"
#: The gsplat release the adapter (trainer/render/gsplat.py) was written against.
GSPLAT_SPEC = "gsplat==1.5.3"
#: PyPI wheels too large to carry (64 MiB) that are installed only when PyPI answers.
#: TensorRT is absent on purpose: its ``-libs`` packages on PyPI are stub sdists that
#: download from NVIDIA's own index at install time (see docs/benchmarks.md).
NETWORK_ONLY = {"onnxruntime-gpu": "onnxruntime-gpu==1.31.1"}


# ---------------------------------------------------------------------------- processes
def run_logged(cmd: list[str], timeout: float, log: Path, env: dict | None = None, cwd: Path | None = None,
               echo: bool = False) -> dict:
    """Run ``cmd`` in its own process group, appending its output to ``log``, killed at ``timeout``.

    Returns:
        dict ``rc`` (None when killed), ``seconds``, ``timed_out`` and ``tail`` (last 40 lines).
    """
    t0 = time.monotonic()
    tail: collections.deque[str] = collections.deque(maxlen=40)
    with open(log, "a", encoding="utf-8", errors="replace") as lf:
        lf.write(f"\n$ {' '.join(map(str, cmd))}\n")
        lf.flush()
        try:
            p = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, env=env, cwd=cwd, start_new_session=True)
        except OSError as exc:
            lf.write(f"cannot start: {exc}\n")
            return {"rc": None, "seconds": 0.0, "timed_out": False, "tail": [f"cannot start: {exc}"]}

        def pump():
            for raw in iter(p.stdout.readline, b""):
                line = raw.decode("utf-8", "replace")
                # progress bars redraw with carriage returns: keep their last state only
                line = line.rstrip("\n").split("\r")[-1]
                lf.write(line + "\n")
                tail.append(line)
                if echo:
                    print("    " + line, flush=True)

        th = threading.Thread(target=pump, daemon=True)
        th.start()
        timed_out = False
        try:
            p.wait(timeout=max(timeout, 0.1))
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(p)
        th.join(timeout=5)
        lf.write(f"[exit {p.returncode}{' (time-box reached)' if timed_out else ''} after "
                 f"{time.monotonic() - t0:.1f} s]\n")
    return {"rc": None if timed_out else p.returncode, "seconds": time.monotonic() - t0,
            "timed_out": timed_out, "tail": list(tail)}


def _kill_group(p: subprocess.Popen) -> None:
    """SIGTERM the process group this check started, then SIGKILL it after 5 s."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def entry_points() -> dict[str, str]:
    """``{console script: "module:function"}`` from pyproject.toml (the source of truth)."""
    import tomllib

    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    return dict(data["project"]["scripts"])


# ---------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    """The ``gpu_check`` argument parser (``run`` is the default sub-command)."""
    p = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command")
    r = sub.add_parser("run", help="run the check (default)")
    r.add_argument("--dry-run", action="store_true",
                   help="install nothing, no network: run the CPU halves, skip the GPU halves with reasons")
    r.add_argument("--rehearse", action="store_true",
                   help="with --dry-run: also run train/export/play on the CPU at toy sizes")
    r.add_argument("--out", type=Path, default=None, help="report folder (default $OUT, else gpu_check_out)")
    r.add_argument("--work", type=Path, default=None,
                   help="scratch folder for runs and bundles, kept (default: a temp dir, removed at the end)")
    r.add_argument("--stage", type=Path, default=REPO / STAGE_DIR, help=f"staged data and wheels ({STAGE_DIR})")
    r.add_argument("--data", type=Path, default=None,
                   help="data root (default: <stage>/data if staged, else $FMGS_DATA or ../shared/data)")
    r.add_argument("--only", default="", help="comma-separated steps to run (others skipped): " + ",".join(STEPS))
    r.add_argument("--skip", default="", help="comma-separated steps to skip")
    r.add_argument("--budget", type=float, default=540.0,
                   help="seconds for the whole run, installs included (default 540: one 600 s device call)")
    r.add_argument("--timeout", action="append", default=[], metavar="STEP=SECONDS",
                   help="override one step's time-box (repeatable)")
    r.add_argument("--iterations", type=int, default=300, help="training iterations with backend=gsplat (300)")
    r.add_argument("--image-size", type=int, default=512, help="training / parity resolution (512)")
    r.add_argument("--play-size", type=int, default=1024, help="fmgs-play render size (1024)")
    r.add_argument("--play-frames", type=int, default=120, help="frames timed by bench_play (120)")
    r.add_argument("--no-network", action="store_true", help="never try PyPI, even when it answers")
    s = sub.add_parser("stage", help="prepare .gpucheck/ (data subset + wheels) on a CPU machine")
    s.add_argument("--stage", type=Path, default=REPO / STAGE_DIR)
    s.add_argument("--data", type=Path, default=None, help="data root (default $FMGS_DATA or ../shared/data)")
    s.add_argument("--train-step", type=int, default=5, help="keep every n-th training frame (5)")
    s.add_argument("--no-wheels", action="store_true", help="stage the data only")
    s.add_argument("--no-gl", action="store_true", help="do not fetch the EGL loader .debs")
    s.add_argument("--max-mib", type=float, default=56.0,
                   help="refuse a stage larger than this (the device tool carries 64 MiB with the repo)")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse, defaulting to ``run``; raise SystemExit(2) with a one-line message on bad input."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("run", "stage", "-h", "--help"):
        argv = ["run", *argv]
    p = build_parser()
    a = p.parse_args(argv)
    if a.command == "run":
        for name in filter(None, (a.only + "," + a.skip).split(",")):
            if name.strip() not in STEPS:
                p.error(f"unknown step {name.strip()!r}; steps are {', '.join(STEPS)}")
        a.timeouts = dict(DEFAULT_TIMEOUTS)
        for item in a.timeout:
            name, _, sec = item.partition("=")
            if name not in STEPS:
                p.error(f"--timeout {item!r}: unknown step {name!r}")
            try:
                a.timeouts[name] = float(sec)
            except ValueError:
                p.error(f"--timeout {item!r}: seconds must be a number")
        if a.rehearse and not a.dry_run:
            p.error("--rehearse goes with --dry-run")
        if a.budget <= REPORT_RESERVE_S:
            p.error(f"--budget must be more than {REPORT_RESERVE_S:g} s")
    return a


def selected_steps(a: argparse.Namespace) -> dict[str, str | None]:
    """``{step: None (run) or reason it is skipped by flag}``."""
    only = {s.strip() for s in a.only.split(",") if s.strip()}
    skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    out = {}
    for s in STEPS:
        if s in skip:
            out[s] = "skipped by --skip"
        elif only and s not in only:
            out[s] = "not in --only"
        else:
            out[s] = None
    return out


def data_root_for(a: argparse.Namespace) -> tuple[Path, dict]:
    """The data root and the staged subset's split (``{}`` for a full data root)."""
    if a.data is not None:
        root = a.data
    elif (a.stage / "data").is_dir():
        root = a.stage / "data"
    else:
        root = Path(os.environ.get("FMGS_DATA") or REPO.parent / "shared" / "data")
    info = {}
    meta = a.stage / "stage.json"
    if meta.is_file() and root.resolve() == (a.stage / "data").resolve():
        info = json.loads(meta.read_text()).get("split", {})
    return root.resolve(), info


# ---------------------------------------------------------------------------- install
def _dist_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def pypi_reachable(timeout: float = 4.0) -> tuple[bool, str]:
    """Whether PyPI's simple index answers within ``timeout`` seconds."""
    import urllib.request

    try:
        with urllib.request.urlopen("https://pypi.org/simple/pip/", timeout=timeout) as r:
            return r.status == 200, f"PyPI answered (HTTP {r.status})"
    except Exception as exc:  # no route, DNS failure, proxy refusal: all mean "no"
        return False, f"PyPI unreachable ({exc.__class__.__name__}: {exc})"


def project_import_path(work: Path, python: str = sys.executable) -> Path | None:
    """A folder that makes ``import fmgs.trainer`` etc. resolve to this checkout without a build.

    pyproject maps ``fmgs.trainer`` -> ``trainer/`` (and export/runtime/assets likewise);
    the same layout as symbolic links under ``work/pkgs/fmgs``. Returns None when the
    project already imports from this checkout (an editable install).
    """
    probe = subprocess.run([python, "-c", "import fmgs.trainer, sys; print(fmgs.trainer.__file__)"],
                           capture_output=True, text=True, cwd="/")
    if probe.returncode == 0 and Path(probe.stdout.strip()).resolve().parent == (REPO / "trainer").resolve():
        return None
    import tomllib

    dirs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    root = work / "pkgs"
    pkg = root / "fmgs"
    if pkg.exists():
        shutil.rmtree(pkg)
    pkg.mkdir(parents=True)
    for entry in (REPO / "fmgs").iterdir():
        (pkg / entry.name).symlink_to(entry)
    for name, rel in dirs.items():
        if name.startswith("fmgs."):
            (pkg / name.split(".", 1)[1]).symlink_to(REPO / rel)
    return root


def install_plan(a: argparse.Namespace) -> list[dict]:
    """What the install step does for each package: present, carried wheel, PyPI, or impossible."""
    wheels = sorted((a.stage / "wheels").glob("*.whl")) if (a.stage / "wheels").is_dir() else []

    def carried(prefix: str) -> str | None:
        key = prefix.replace("-", "_").lower()
        hit = [w.name for w in wheels if w.name.lower().startswith(key + "-")]
        return hit[0] if hit else None

    plan = []
    for dist, module in (("torch", "torch"), ("gsplat", "gsplat"), ("cupy", "cupy"),
                         ("onnxruntime-gpu", "onnxruntime"), ("tensorrt", "tensorrt"),
                         ("tinycudann", "tinycudann")):
        item = {"package": dist, "module": module}
        have = _module_version(module)
        if dist == "onnxruntime-gpu":
            have_gpu = _dist_version("onnxruntime-gpu")
            item["present"] = f"onnxruntime-gpu {have_gpu}" if have_gpu else None
            item["note"] = f"CPU onnxruntime {have}" if have and not have_gpu else None
        else:
            item["present"] = f"{dist} {have}" if have else None
        if item["present"]:
            item["action"] = "present"
        elif carried(dist):
            item["action"] = f"carried wheel {carried(dist)}"
        elif dist in NETWORK_ONLY:
            item["action"] = f"PyPI only ({NETWORK_ONLY[dist]}, 256 MB: too large to carry)"
        elif dist == "gsplat":
            item["action"] = f"PyPI {GSPLAT_SPEC} (stage it to carry)"
        elif dist == "tensorrt":
            item["action"] = ("not installable: PyPI's tensorrt-cu1x-libs are stub sdists that download "
                              "from NVIDIA's index at install time")
        elif dist == "tinycudann":
            item["action"] = "not installable: no tinycudann wheel on PyPI (source build needs git submodules)"
        elif dist == "cupy":
            item["action"] = "PyPI cupy-cuda13x / cupy-cuda12x (matching torch's CUDA)"
        else:
            item["action"] = "PyPI (CUDA build: ~530 MB torch + ~3 GB nvidia-* wheels; not attempted)"
        plan.append(item)
    for w in wheels:
        dist = w.name.split("-")[0].replace("_", "-").lower()
        if dist in ("gsplat",):
            continue
        mod = {"antlr4-python3-runtime": "antlr4", "opencv-python-headless": "cv2",
               "imageio-ffmpeg": "imageio_ffmpeg"}.get(dist, dist.replace("-", "_"))
        have = _module_version(mod)
        plan.append({"package": dist, "module": mod, "present": f"{dist} {have}" if have else None,
                     "action": "present" if have else f"carried wheel {w.name}"})
    return plan


def _module_version(module: str) -> str | None:
    """Version of an importable module, found without importing it (None when absent)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return None
    names = {"torch": "torch", "gsplat": "gsplat", "onnxruntime": "onnxruntime", "tensorrt": "tensorrt",
             "tinycudann": "tinycudann", "antlr4": "antlr4-python3-runtime"}
    from importlib import metadata

    cands = [names.get(module, module)]
    if module == "cupy":
        cands = [d.metadata["Name"] for d in metadata.distributions()
                 if (d.metadata["Name"] or "").lower().startswith("cupy")]
    if module == "onnxruntime":
        cands = ["onnxruntime-gpu", "onnxruntime"]
    if module == "tensorrt":
        cands = ["tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt-cu13-bindings", "tensorrt-cu12-bindings"]
    for c in cands:
        v = _dist_version(c)
        if v:
            return v
    return "present"


def do_install(a: argparse.Namespace, work: Path, log: Path, deadline: float) -> dict:
    """The install step (real mode): carried wheels, PyPI when it answers, EGL .debs."""
    res = {"numbers": {}, "notes": []}
    py = sys.executable
    plan = install_plan(a)
    res["numbers"]["plan"] = plan
    net_ok, net_msg = (False, "--no-network") if a.no_network else pypi_reachable()
    res["numbers"]["pypi"] = net_msg
    timings = {}
    left = lambda: deadline - time.monotonic()  # noqa: E731
    pip = [py, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--disable-pip-version-check"]
    carried = [a.stage / "wheels" / it["action"].split()[-1] for it in plan if it["action"].startswith("carried")]
    if carried:
        r = run_logged(pip + ["--no-index", *map(str, carried)], min(90, left()), log)
        timings["carried_wheels_s"] = round(r["seconds"], 1)
        if r["rc"] != 0:
            res["notes"].append("carried wheels: pip failed: " + " | ".join(r["tail"][-3:]))
    for it in plan:
        if it["action"] == "present" or it["action"].startswith("carried") or left() < 20:
            continue
        spec = {"gsplat": GSPLAT_SPEC, **NETWORK_ONLY}.get(it["package"])
        if it["package"] == "cupy":
            spec = _cupy_spec(py)
        if not spec:
            continue  # not installable: the plan says why
        if not net_ok:
            res["notes"].append(f"{it['package']}: not installed: {net_msg}")
            continue
        if it["package"] == "onnxruntime-gpu" and _dist_version("onnxruntime"):
            # both distributions own the 'onnxruntime' module: the CPU one must go first
            run_logged([py, "-m", "pip", "uninstall", "-y", "-q", "onnxruntime"], min(60, left()), log)
        r = run_logged(pip + ["--timeout", "20", spec], min(150, left()), log)
        timings[f"{it['package']}_s"] = round(r["seconds"], 1)
        if r["rc"] != 0:
            res["notes"].append(f"{spec}: pip failed: " + " | ".join(r["tail"][-2:]))
    pkgs = project_import_path(work, py)
    res["numbers"]["project"] = "editable install of this checkout" if pkgs is None else f"symlink tree {pkgs}"
    res["numbers"]["gl"] = _unpack_gl(a.stage / "gl", log)
    res["numbers"]["timings"] = timings
    res["pythonpath"] = None if pkgs is None else str(pkgs)
    return res


def _cupy_spec(py: str) -> str | None:
    out = subprocess.run([py, "-c", "import torch; print(torch.version.cuda or '')"], capture_output=True, text=True)
    major = (out.stdout.strip().split(".") or [""])[0]
    return {"12": "cupy-cuda12x", "13": "cupy-cuda13x"}.get(major)


def _unpack_gl(gl_dir: Path, log: Path) -> str:
    """Unpack carried EGL/GL loader .debs into / (the device README's recipe), then ldconfig."""
    debs = sorted(gl_dir.glob("*.deb")) if gl_dir.is_dir() else []
    if not debs:
        return "no carried GL .debs (stage without --no-gl to bring them)"
    if os.geteuid() != 0:
        return "GL .debs carried but not unpacked: not root"
    if subprocess.run(["sh", "-c", "ldconfig -p | grep -q libEGL.so.1"]).returncode == 0:
        return "libEGL already present; carried .debs not needed"
    for d in debs:
        run_logged(["dpkg", "-x", str(d), "/"], 30, log)
    run_logged(["ldconfig"], 30, log)
    return f"unpacked {len(debs)} .debs: " + ", ".join(d.name.split("_")[0] for d in debs)


# ---------------------------------------------------------------------------- report
def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)) and v and isinstance(v[0], dict):
        return "; ".join(_fmt(x) for x in v)
    return str(v)


def summary_line(step: dict) -> str:
    """One table cell: the reason for a skip/failure, else the headline numbers."""
    head = step.get("headline")
    if step["status"] in ("skipped", "failed", "timeout") and step.get("reason"):
        return step["reason"] + (f" ({head})" if head else "")
    return head or ""


def write_report(out: Path, report: dict) -> tuple[Path, Path]:
    """Write ``gpu_check.json`` and ``gpu_check.md`` atomically into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    jpath, mpath = out / "gpu_check.json", out / "gpu_check.md"
    write_json_atomic(jpath, report)
    env = report["environment"]
    lines = [f"### GPU readiness check: {report['mode']} ({report['finished_utc'][:16].replace('T', ' ')} UTC)", "",
             f"Machine: {env.get('nvidia_smi') or 'no NVIDIA GPU'}"
             + (f" (torch sees {env['torch_device']}, compute capability {env.get('compute_capability')})"
                if env.get("torch_device") else "")
             + f"; {env.get('cpu_count')} CPU cores; Python {env.get('python')}"
             + (f"; nvcc {env['nvcc']}" if env.get("nvcc") else "") + ".", "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items()) + ".", "",
             f"Command: `{report['command']}`; {report['total_seconds']:.0f} s of a {report['budget_s']:.0f} s "
             f"budget; {report['counts']}.", "",
             "| step | status | s | result |", "|---|---|---|---|"]
    for s in report["steps"]:
        cell = summary_line(s).replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {s['name']} | {s['status']} | {s.get('seconds', 0):.1f} | {cell} |")
    lines.append("")
    for s in report["steps"]:
        nums = s.get("numbers") or {}
        if not nums and not s.get("notes"):
            continue
        lines.append(f"- **{s['name']}**: " + "; ".join(f"{k} = {_fmt(v)}" for k, v in nums.items()
                                                        if k not in ("plan",)))
        for it in nums.get("plan", []) if isinstance(nums.get("plan"), list) else []:
            lines.append(f"  - {it['package']}: {it['action']}" + (f" ({it['note']})" if it.get("note") else ""))
        for n in s.get("notes", []):
            lines.append(f"  - {n}")
    with atomic_path(mpath) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return jpath, mpath


# ---------------------------------------------------------------------------- run
def run_check(a: argparse.Namespace, argv: list[str]) -> int:
    """The ``run`` sub-command."""
    t_start = time.monotonic()
    deadline = t_start + a.budget - REPORT_RESERVE_S
    out = Path(a.out or os.environ.get("OUT") or "gpu_check_out").resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(a.work).resolve() if a.work else Path(__import__("tempfile").mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    log = out / "gpu_check.log"
    log.write_text(f"gpu_check {' '.join(argv)}\n")
    root, split = data_root_for(a)
    sel = selected_steps(a)
    mode = "dry run" + (" + CPU rehearsal" if a.rehearse else "") if a.dry_run else "GPU run"
    print(f"gpu_check: {mode}; report -> {out}; scratch {work}; data {root}; budget {a.budget:.0f} s", flush=True)
    ctx = {"dry": bool(a.dry_run), "rehearse": bool(a.rehearse), "repo": str(REPO), "work": str(work),
           "data_root": str(root), "split": split, "iterations": int(a.iterations),
           "image_size": int(a.image_size), "play_size": int(a.play_size), "play_frames": int(a.play_frames),
           "python": sys.executable, "entry_points": entry_points(), "results": {}}
    env = dict(os.environ, PYTHONUNBUFFERED="1", FMGS_DATA=str(root), TQDM_DISABLE="1")
    # the device machines' NVIDIA EGL vendor file (their README): glvnd's loader needs it named
    nv_egl = Path("/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json")
    if nv_egl.is_file():
        env.setdefault("__EGL_VENDOR_LIBRARY_FILENAMES", str(nv_egl))
    steps = []
    for i, name in enumerate(STEPS):
        t0 = time.monotonic()
        later = sum(RESERVE[s] for s in STEPS[i + 1:] if sel[s] is None)
        box = min(a.timeouts[name], deadline - time.monotonic() - later)
        rec = {"name": name, "status": "skipped", "reason": None, "seconds": 0.0, "numbers": {}, "notes": []}
        if sel[name] is not None:
            rec["reason"] = sel[name]
        elif box < min(RESERVE[name], a.timeouts[name]):
            rec["reason"] = f"budget exhausted ({max(box, 0):.0f} s left for this step)"
        elif name == "install":
            rec.update(_install_step(a, work, log, time.monotonic() + box))
            if rec.get("pythonpath"):
                env["PYTHONPATH"] = rec["pythonpath"] + os.pathsep + env.get("PYTHONPATH", "")
        else:
            rec.update(_python_step(name, ctx, work, log, box, env))
        rec["seconds"] = round(time.monotonic() - t0, 2)
        rec["time_box_s"] = round(box, 1) if sel[name] is None else None
        ctx["results"][name] = {k: rec.get(k) for k in ("status", "numbers")}
        steps.append(rec)
        print(f"  {name:<14} {rec['status']:<8} {rec['seconds']:6.1f} s  {summary_line(rec)[:150]}", flush=True)
    counts = collections.Counter(s["status"] for s in steps)
    report = {
        "tool": "benchmarks/gpu_check.sh", "mode": mode, "command": "bash benchmarks/gpu_check.sh " + " ".join(argv),
        "started_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "finished_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "budget_s": a.budget, "total_seconds": round(time.monotonic() - t_start, 2),
        "counts": ", ".join(f"{n} {k}" for k, n in sorted(counts.items())),
        "environment": (steps[0].get("numbers") if steps[0]["status"] == "passed" else {}) or _basic_env(),
        "data_root": str(root), "split": split, "steps": steps,
    }
    jpath, mpath = write_report(out, report)
    if a.work is None:  # a scratch folder of our own: runs and bundles are not part of the report
        shutil.rmtree(work, ignore_errors=True)
    print(f"gpu_check: {report['counts']} in {report['total_seconds']:.0f} s; wrote {jpath.name}, {mpath.name}, "
          f"{log.name} in {out}", flush=True)
    return 0


def _basic_env() -> dict:
    return {"python": platform.python_version(), "cpu_count": os.cpu_count(), "versions": {}}


def _install_step(a, work: Path, log: Path, deadline: float) -> dict:
    if a.dry_run:
        pkgs = project_import_path(work)
        return {"status": "skipped", "reason": "dry run: nothing installed, no network",
                "numbers": {"plan": install_plan(a),
                            "project": "editable install of this checkout" if pkgs is None else f"symlink tree {pkgs}"},
                "pythonpath": None if pkgs is None else str(pkgs),
                "headline": "plan only"}
    try:
        res = do_install(a, work, log, deadline)
    except Exception as exc:  # the report must still be written
        return {"status": "failed", "reason": f"{exc.__class__.__name__}: {exc}"}
    failed = [n for n in res["notes"] if "pip failed" in n]
    res["status"] = "passed" if not failed else "failed"
    res["reason"] = None if not failed else "; ".join(failed)
    res["headline"] = f"{res['numbers']['pypi']}; {res['numbers']['project']}"
    return res


def _python_step(name: str, ctx: dict, work: Path, log: Path, box: float, env: dict) -> dict:
    """Run one step of gpu_check_steps.py in its own process group under the time-box."""
    cpath, rpath = work / f"ctx_{name}.json", work / f"result_{name}.json"
    rpath.unlink(missing_ok=True)
    ctx = dict(ctx, step=name, time_box_s=box, started=time.time())
    write_json_atomic(cpath, ctx)
    cmd = [ctx["python"], str(REPO / "benchmarks" / "gpu_check_steps.py"), name, str(cpath), str(rpath)]
    # not the checkout: its fmgs/ would shadow the package layout that maps fmgs.trainer -> trainer/
    r = run_logged(cmd, box, log, env=env, cwd=work)
    res = {}
    if rpath.is_file():
        try:
            res = json.loads(rpath.read_text())
        except ValueError as exc:
            res = {"status": "failed", "reason": f"unreadable result file ({exc})"}
    if r["timed_out"]:
        res.update(status="timeout", reason=f"time-box of {box:.0f} s reached" +
                   (f" during: {res['reason']}" if res.get("reason") else ""))
    elif not res:
        res = {"status": "failed", "reason": f"step process exited {r['rc']} without a result: "
                                             + " | ".join(line for line in r["tail"][-3:] if line.strip())}
    if res.get("status") in ("failed", "timeout"):
        res["log_tail"] = r["tail"][-15:]
    return res


# ---------------------------------------------------------------------------- stage
def stage(a: argparse.Namespace) -> int:
    """The ``stage`` sub-command: write the data subset, wheels and GL .debs into ``a.stage``."""
    import pickle

    src = Path(a.data or os.environ.get("FMGS_DATA") or REPO.parent / "shared" / "data").resolve()
    seq = src / "zju_mocap" / "377"
    need = [seq / "cameras.pkl", seq / "mesh_infos.pkl", seq / "canonical_joints.pkl",
            src / "body_models" / "smpl" / "SMPL_NEUTRAL.pkl", src / "body_models" / "smpl" / "smplh_parts_segm.pkl",
            src / "motion" / "smpl72_sequences" / "walking.npy"]
    for f in need:
        if not f.is_file():
            print(f"gpu_check stage: error: {f}: not found (set --data or $FMGS_DATA)", file=sys.stderr)
            return 2
    sys.path.insert(0, str(REPO))
    from fmgs.pickle_io import load_pickle

    dest = a.stage
    tmp = dest.with_name(dest.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    d377 = tmp / "data" / "zju_mocap" / "377"
    (d377 / "images").mkdir(parents=True)
    (d377 / "masks").mkdir()
    cams = load_pickle(seq / "cameras.pkl")
    infos = load_pickle(seq / "mesh_infos.pkl")
    names = sorted(cams)
    # the default split (train 0-454, test 455-569 every 5th) on a subset of the frames
    train = names[0:455:a.train_step]
    test = names[455:570:5]
    keep = train + test
    for n in keep:
        shutil.copy2(seq / "images" / f"{n}.png", d377 / "images")
        shutil.copy2(seq / "masks" / f"{n}.png", d377 / "masks")
    for fname, obj in (("cameras.pkl", cams), ("mesh_infos.pkl", infos)):
        with open(d377 / fname, "wb") as f:
            pickle.dump({n: obj[n] for n in keep}, f, protocol=4)
    shutil.copy2(seq / "canonical_joints.pkl", d377)
    for rel in ("body_models/smpl/SMPL_NEUTRAL.pkl", "body_models/smpl/smplh_parts_segm.pkl",
                "motion/smpl72_sequences/walking.npy"):
        (tmp / "data" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / rel, tmp / "data" / rel)
    split = {"train_range": [0, len(train)], "train_step": 1, "test_range": [len(train), len(keep)],
             "test_step": 1, "source_train_step": a.train_step, "frames": len(keep)}
    notes = []
    timings = {}
    if not a.no_wheels:
        t = time.monotonic()
        notes += _stage_wheels(tmp / "wheels")
        timings["wheels_download_s"] = round(time.monotonic() - t, 1)
    if not a.no_gl:
        t = time.monotonic()
        notes += _stage_gl(tmp / "gl")
        timings["gl_debs_download_s"] = round(time.monotonic() - t, 1)
    size = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
    meta = {"split": split, "bytes": size, "timings": timings, "notes": notes,
            "wheels": sorted(p.name for p in (tmp / "wheels").glob("*.whl")),
            "gl_debs": sorted(p.name for p in (tmp / "gl").glob("*.deb")),
            "made_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    write_json_atomic(tmp / "stage.json", meta)
    if size > a.max_mib * 2**20:
        shutil.rmtree(tmp)
        print(f"gpu_check stage: error: {size / 2**20:.1f} MiB staged, over --max-mib {a.max_mib:g}; nothing kept",
              file=sys.stderr)
        return 2
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    for n in notes:
        print(f"gpu_check stage: note: {n}")
    print(f"gpu_check stage: {dest} ({size / 2**20:.1f} MiB: {len(keep)} frames, {len(meta['wheels'])} wheels, "
          f"{len(meta['gl_debs'])} GL .debs); carry it: run(..., carry=['{STAGE_DIR}'])")
    return 0


#: Wheels carried to the GPU machine: gsplat, and the project's pure-Python (or small)
#: dependencies that the device image lacks (KINDS.md's package list), at the versions
#: installed here.
STAGED_WHEELS = ("trimesh", "omegaconf", "antlr4-python3-runtime", "moderngl", "glcontext", "glfw", "smplx")


def _stage_wheels(dest: Path) -> list[str]:
    dest.mkdir(parents=True, exist_ok=True)
    plat = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp"]
    for tag in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                "manylinux2014_x86_64", "manylinux1_x86_64", "any"):
        plat += ["--platform", tag]
    specs = [GSPLAT_SPEC] + [f"{n}=={_dist_version(n)}" if _dist_version(n) else n for n in STAGED_WHEELS]
    notes = []
    for spec in specs:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", *plat, "-d", str(dest), spec],
                           capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            notes.append(f"{spec}: no cp312 x86_64 wheel downloaded ({r.stderr.strip().splitlines()[-1:]})")
    return notes


def _stage_gl(dest: Path) -> list[str]:
    """The device README's EGL loaders (amd64 .debs through an isolated apt list folder)."""
    if shutil.which("apt-get") is None:
        return ["apt-get not found: GL .debs not staged (the OpenGL renderer then falls back to the CPU one)"]
    dest.mkdir(parents=True, exist_ok=True)
    lists = Path("/tmp/gpu_check_apt_amd64")
    (lists / "partial").mkdir(parents=True, exist_ok=True)
    o = ["-oAPT::Architecture=amd64", "-oAPT::Architectures=amd64", f"-oDir::State::Lists={lists}"]
    r = subprocess.run(["apt-get", *o, "-q", "update"], capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        return [f"apt-get update failed: GL .debs not staged ({r.stderr.strip()[-200:]})"]
    pk = ["libvulkan1", "libegl1", "libglvnd0", "libopengl0", "libgl1", "libglx0", "libgles2"]
    r = subprocess.run(["apt-get", *o, "download", *pk], capture_output=True, text=True, cwd=dest, timeout=300)
    if r.returncode != 0:
        return [f"apt-get download failed: GL .debs not staged ({r.stderr.strip()[-200:]})"]
    return []


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    if a.command == "stage":
        return stage(a)
    return run_check(a, argv)


if __name__ == "__main__":
    sys.exit(main())
