"""benchmarks/paired_eval.py: the paired and the symmetric two-fitter comparisons on exactly
known per-frame records, and bad input."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

_spec = importlib.util.spec_from_file_location(
    "paired_eval", Path(__file__).parents[1] / "benchmarks" / "paired_eval.py")
pe = importlib.util.module_from_spec(_spec)
sys.modules["paired_eval"] = pe
_spec.loader.exec_module(pe)

KEYS = [k for k, _ in pe.KEYS]


def records(values: dict[str, np.ndarray]) -> dict[str, dict]:
    """``{frame_0000NN: {key: value}}`` from one (n,) array per metric key."""
    n = len(next(iter(values.values())))
    return {f"frame_{i:06d}": {k: float(values[k][i]) for k in KEYS} for i in range(n)}


def write_eval(folder: Path, recs: dict[str, dict]) -> Path:
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(
        {"frames": [{"frame": n, **r} for n, r in sorted(recs.items())]}))
    return folder


def test_one_block_of_the_whole_series_gives_a_zero_width_interval_at_the_mean():
    d = np.random.default_rng(0).normal(size=17)
    lo, hi = pe.block_bootstrap_interval(d, block=17, resamples=200)
    assert lo == pytest.approx(d.mean(), abs=1e-12) and hi == pytest.approx(d.mean(), abs=1e-12)
    lo1, hi1 = pe.block_bootstrap_interval(d, block=1, resamples=4000)
    assert d.min() <= lo1 < d.mean() < hi1 <= d.max()


def test_paired_differences_match_a_per_frame_loop():
    rng = np.random.default_rng(1)
    a = {k: rng.normal(size=12) for k in KEYS}
    b = {k: a[k] + rng.normal(0.1, 0.2, size=12) for k in KEYS}
    A, B = records(a), records(b)
    del B["frame_000003"]                                  # only the shared frames count
    out = pe.paired_differences(A, B, block=3, resamples=500)
    for k in KEYS:
        d = [B[n][k] - A[n][k] for n in sorted(B)]
        assert out[k]["frames"] == 11
        assert out[k]["mean_difference"] == pytest.approx(np.mean(d), abs=1e-12)
        assert out[k]["wins"] == sum(x > 0 for x in d)


def test_the_symmetric_difference_cancels_an_equal_fitter_advantage_exactly():
    rng = np.random.default_rng(2)
    n = 20
    a = {k: rng.normal(30, 1, n) for k in KEYS}             # A and B at neutral poses
    b = {k: a[k] + 0.4 for k in KEYS}                       # B truly 0.4 ahead
    f = {k: rng.uniform(0.5, 1.5, n) for k in KEYS}         # what fitting a pose through a model gives it
    a_pa = records({k: a[k] + f[k] for k in KEYS})
    b_pa = records(b)
    a_pb = records(a)
    b_pb = records({k: b[k] + f[k] for k in KEYS})
    SA, SB = pe.symmetric_records(a_pa, b_pa, a_pb, b_pb)
    for k in KEYS:
        assert all(SB[m][k] - SA[m][k] == pytest.approx(0.4, abs=1e-9) for m in SA)
    # at one fitter's poses that fitter wins whatever the truth; the symmetric one does not
    at_pa = pe.paired_differences(a_pa, b_pa, 5, 200)["psnr"]["mean_difference"]
    assert at_pa < 0 < pe.paired_differences(SA, SB, 5, 200)["psnr"]["mean_difference"]


def test_symmetric_is_the_mean_of_each_at_its_own_and_crossed():
    rng = np.random.default_rng(3)
    four = [records({k: rng.normal(size=9) for k in KEYS}) for _ in range(4)]
    a_pa, b_pa, a_pb, b_pb = four
    SA, SB = pe.symmetric_records(a_pa, b_pa, a_pb, b_pb)
    for m in SA:
        for k in KEYS:
            own = b_pb[m][k] - a_pa[m][k]
            crossed = b_pa[m][k] - a_pb[m][k]
            assert SB[m][k] - SA[m][k] == pytest.approx(0.5 * (own + crossed), abs=1e-12)


def test_main_prints_the_three_tables_and_names_a_missing_folder(tmp_path, capsys):
    rng = np.random.default_rng(4)
    dirs = [write_eval(tmp_path / name, records({k: rng.normal(size=8) for k in KEYS}))
            for name in ("a_pa", "b_pa", "a_pb", "b_pb")]
    assert pe.main([str(dirs[0]), str(dirs[1]), "--also", str(dirs[2]), str(dirs[3]),
                    "--resamples", "200"]) == 0
    out = capsys.readouterr().out
    assert "symmetric" in out and "each at its own" in out and "crossed" in out
    assert out.count("| PSNR (dB) |") == 3
    with pytest.raises(SystemExit, match="nowhere/metrics.json"):
        pe.main([str(dirs[0]), str(tmp_path / "nowhere")])
    write_eval(tmp_path / "other", {"frame_999999": {k: 0.0 for k in KEYS}})
    with pytest.raises(SystemExit, match="share no scored frame"):
        pe.main([str(dirs[0]), str(dirs[1]), "--also", str(dirs[2]), str(tmp_path / "other")])
