"""The GPU readiness check's own logic (benchmarks/gpu_check.py), in its dry mode.

No GPU, no install, no network: the dry run must walk every step, skip each GPU half
with a reason, run the CPU halves, and write a well-formed JSON + markdown report.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT, _data_root

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import gpu_check  # noqa: E402

STATUSES = {"passed", "failed", "skipped", "timeout"}


def _run(args: list[str], tmp_path: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """The check as a person runs it, with every network route closed (a proxy nobody serves)."""
    env = dict(os.environ, http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9",
               HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9", PIP_NO_INDEX="1",
               OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    env.pop("OUT", None)
    return subprocess.run(["bash", str(REPO_ROOT / "benchmarks" / "gpu_check.sh"), *args,
                           "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"),
                           "--stage", str(tmp_path / "no_stage")],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp_path)


def _report(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "out" / "gpu_check.json").read_text())


def test_dry_run_walks_every_step_and_writes_the_report(tmp_path):
    data = _data_root()
    have_data = (data / "zju_mocap" / "377" / "cameras.pkl").is_file()
    args = ["--dry-run", "--data", str(data)] + ([] if have_data else ["--skip", "raster_parity"])
    p = _run(args, tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    rep = _report(tmp_path)
    assert rep["mode"] == "dry run"
    assert [s["name"] for s in rep["steps"]] == list(gpu_check.STEPS)
    by = {s["name"]: s for s in rep["steps"]}
    for s in rep["steps"]:
        assert s["status"] in STATUSES
        if s["status"] != "passed":
            assert s["reason"], s          # every skip or failure says why
    assert by["env"]["status"] == "passed"
    assert rep["environment"]["python"] and "versions" in rep["environment"]
    # install: a plan, nothing installed, the registry never asked
    inst = by["install"]
    assert inst["status"] == "skipped" and "dry run" in inst["reason"]
    plan = {it["package"]: it["action"] for it in inst["numbers"]["plan"]}
    assert {"torch", "gsplat", "cupy", "onnxruntime-gpu", "tensorrt", "tinycudann"} <= set(plan)
    assert "pypi" not in inst["numbers"]
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert "pip" not in log.split("\n", 1)[1]
    # GPU halves skipped, with the reason from the project's own probes
    for name in ("gsplat_build", "train", "export", "play"):
        assert by[name]["status"] == "skipped"
        assert "dry run" in by[name]["reason"] or "no training run" in by[name]["reason"]
    assert "300-iteration backend=gsplat" in by["train"]["reason"]
    assert "probes" in by["play"]["numbers"]
    # CPU halves ran
    assert by["tcnn"]["numbers"]["torch_grid_finite"] is True
    if have_data:
        rp = by["raster_parity"]
        assert rp["status"] == "skipped" and rp["reason"].startswith("gsplat half")
        assert rp["numbers"]["cpu_finite"] is True and rp["numbers"]["surfels"] == 2000
        assert rp["numbers"]["surfels_total"] == 55104        # real 377 surfels (subdivided SMPL)
        assert 0.0 < rp["numbers"]["cpu_coverage"] < 1.0
    # the markdown a person pastes: one table row per step
    md = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "| step | status | s | result |" in md
    for name in gpu_check.STEPS:
        assert f"| {name} | {by[name]['status']} |" in md


def test_time_box_kills_a_step_and_the_rest_still_runs(tmp_path):
    # env imports torch and several back-ends: far more than 0.5 s
    p = _run(["--dry-run", "--only", "env,install", "--timeout", "env=0.5"], tmp_path, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    by = {s["name"]: s for s in _report(tmp_path)["steps"]}
    assert by["env"]["status"] == "timeout" and "time-box" in by["env"]["reason"]
    assert by["env"]["seconds"] < 15
    assert by["install"]["status"] == "skipped" and "dry run" in by["install"]["reason"]
    assert by["train"]["reason"] == "not in --only"


def test_budget_exhausted_steps_are_skipped_with_the_reason(tmp_path):
    a = gpu_check.parse_args(["--dry-run", "--budget", "10", "--only", "env,tcnn",
                              "--out", str(tmp_path / "out"), "--work", str(tmp_path / "w"),
                              "--stage", str(tmp_path / "s")])
    assert gpu_check.run_check(a, ["--dry-run", "--budget", "10"]) == 0
    by = {s["name"]: s for s in _report(tmp_path)["steps"]}
    assert by["env"]["reason"].startswith("budget exhausted")
    assert by["tcnn"]["reason"].startswith("budget exhausted")
    assert by["play"]["reason"] == "not in --only"


@pytest.mark.parametrize("args, message", [
    (["--only", "nosuch"], "unknown step 'nosuch'"),
    (["--timeout", "env"], "seconds must be a number"),
    (["--rehearse"], "--rehearse goes with --dry-run"),
    (["--budget", "3"], "--budget must be more than"),
])
def test_bad_arguments_exit_2_with_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        gpu_check.parse_args(args)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_stage_writes_a_subset_the_reader_accepts(tmp_path, zju377, data_root):
    from fmgs.pickle_io import load_pickle
    from fmgs.trainer.data.humannerf import HumanNeRFSequence

    a = gpu_check.parse_args(["stage", "--stage", str(tmp_path / "st"), "--data", str(data_root),
                              "--no-wheels", "--no-gl", "--train-step", "50"])
    assert gpu_check.stage(a) == 0
    meta = json.loads((tmp_path / "st" / "stage.json").read_text())
    sp = meta["split"]
    # every 50th of the 455 training frames (10) then the 23 held-out frames (455..565 every 5th)
    assert sp["train_range"] == [0, 10] and sp["test_range"] == [10, 33] and sp["frames"] == 33
    root = tmp_path / "st" / "data" / "zju_mocap" / "377"
    cams = load_pickle(root / "cameras.pkl")
    names = sorted(cams)
    assert names[:2] == ["frame_000000", "frame_000050"] and names[10] == "frame_000455"
    src = load_pickle(zju377 / "cameras.pkl")
    assert (cams["frame_000455"]["intrinsics"] == src["frame_000455"]["intrinsics"]).all()
    cfg = {"train_range": tuple(sp["train_range"]), "train_step": 1, "test_range": tuple(sp["test_range"]),
           "test_step": 1}
    test = HumanNeRFSequence(root, split="test", split_config=cfg)
    assert test.names[0] == "frame_000455" and len(test) == 23
    assert meta["bytes"] < 30 * 2**20
