"""benchmarks/correction_stats.py: its statistics on exactly known data, and bad input."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np

_spec = importlib.util.spec_from_file_location(
    "correction_stats", Path(__file__).parents[1] / "benchmarks" / "correction_stats.py")
cs = importlib.util.module_from_spec(_spec)
sys.modules["correction_stats"] = cs
_spec.loader.exec_module(cs)


def test_ridge_cv_r2_is_one_for_an_exact_linear_map_and_near_zero_for_independent_noise():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(120, 6))
    W = rng.normal(size=(6, 4))
    Y = X @ W + 0.3
    assert cs.ridge_cv_r2(X, Y, 1e-9, 5) > 1 - 1e-9
    noise = rng.normal(size=(120, 4))
    r2 = cs.ridge_cv_r2(X, noise, 100.0, 5)
    assert -0.2 < r2 < 0.1


def test_ridge_cv_r2_equals_a_brute_force_leave_block_out_fit():
    rng = np.random.default_rng(1)
    X, Y = rng.normal(size=(30, 3)), rng.normal(size=(30, 2))
    lam, sse, sst = 2.0, 0.0, 0.0
    for te in (range(0, 10), range(10, 20), range(20, 30)):
        te = list(te)
        tr = [i for i in range(30) if i not in te]
        best = np.zeros((4, 2))
        for k in range(2):   # per output, the normal equations written out in float64
            A = np.hstack([X[tr], np.ones((len(tr), 1))])
            best[:, k] = np.linalg.lstsq(np.vstack([A, np.sqrt(lam) * np.eye(4)]),
                                         np.concatenate([Y[tr, k], np.zeros(4)]), rcond=None)[0]
        pred = np.hstack([X[te], np.ones((len(te), 1))]) @ best
        sse += ((pred - Y[te]) ** 2).sum()
        sst += ((Y[te] - Y[tr].mean(0)) ** 2).sum()
    assert abs(cs.ridge_cv_r2(X, Y, lam, 3) - (1 - sse / sst)) < 1e-12


def test_lag_correlation_of_an_alternating_sequence():
    v = np.array([0.3, -1.0, 2.0])
    D = np.stack([v if t % 2 == 0 else -v for t in range(10)]) + 5.0   # constant part removed inside
    assert abs(cs.lag_correlation(D, 1) + 1.0) < 1e-12
    assert abs(cs.lag_correlation(D, 2) - 1.0) < 1e-12


def test_a_folder_that_is_no_run_is_reported_in_one_line(tmp_path, capsys):
    assert cs.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("correction_stats:") and str(tmp_path) in err[0]
