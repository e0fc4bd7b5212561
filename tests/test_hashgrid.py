"""Hash encoding vs an independent float64 brute-force reference (Instant-NGP / tcnn grid.h).

The reference below is written from the specification (scalar Python loops over
points, levels and corners, Python integers for the uint32 hash), not from the
module's vectorised code.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import cuda_available
from fmgs.trainer.models.hashgrid import (
    HashGrid,
    HashGridConfig,
    normalize_to_bbox,
)

PRIMES = (1, 2654435761, 805459861)


def ref_levels(L, log2T, base, max_res, convention):
    """Per level: (scale, offset, vertices per axis, table size, first row)."""
    b = 1.0 if L == 1 else math.exp(math.log(max_res / base) / (L - 1))
    out, first = [], 0
    for l in range(L):
        raw = base * b**l
        if convention == "tcnn":
            scale, off = raw - 1.0, 0.5
            res = math.ceil(scale) + 1
        else:
            scale, off = float(math.floor(raw + 1e-6)), 0.0
            res = int(scale) + 1
        n = res**3
        if n % 8:
            n += 8 - n % 8
        size = min(n, 2**log2T)
        out.append((scale, off, res, size, first))
        first += size
    return out


def ref_corners(point, cfg):
    """List over levels of 8 (row in the stacked table, weight) pairs for one point."""
    levels = ref_levels(cfg.n_levels, cfg.log2_hashmap_size, cfg.base_resolution, cfg.max_resolution,
                        cfg.convention)
    result = []
    for scale, off, res, size, first in levels:
        p = [min(max(float(point[d]), 0.0), 1.0) * scale + off for d in range(3)]
        g = [math.floor(v) for v in p]
        f = [p[d] - g[d] for d in range(3)]
        corners = []
        for c in range(8):
            w = 1.0
            v = []
            for d in range(3):
                bit = (c >> d) & 1
                w *= f[d] if bit else 1.0 - f[d]
                v.append(g[d] + bit)
            if res**3 <= size:
                i = v[0] + v[1] * res + v[2] * res * res
            else:
                h = 0
                for d in range(3):
                    h ^= (v[d] * PRIMES[d]) % 2**32
                i = h
            corners.append((first + i % size, w))
        result.append(corners)
    return result


def ref_encode(x, table, cfg):
    """Brute-force float64 encoding: (N, 3) -> (N, L*F)."""
    F = cfg.n_features_per_level
    out = np.zeros((len(x), cfg.n_levels * F))
    for n, pt in enumerate(x):
        for l, corners in enumerate(ref_corners(pt, cfg)):
            for row, w in corners:
                out[n, l * F:(l + 1) * F] += w * table[row]
    return out


def ref_table_grad(x, cfg, n_rows, upstream):
    """d(sum(out * upstream)) / d(table), by accumulating weights per row."""
    F = cfg.n_features_per_level
    grad = np.zeros((n_rows, F))
    for n, pt in enumerate(x):
        for l, corners in enumerate(ref_corners(pt, cfg)):
            for row, w in corners:
                grad[row] += w * upstream[n, l * F:(l + 1) * F]
    return grad


def make_grid(cfg, seed=0):
    torch.manual_seed(seed)
    g = HashGrid(cfg, dtype=torch.float64)
    with torch.no_grad():
        g.table.uniform_(-1.0, 1.0)  # O(1) values so that 1e-10 is a meaningful tolerance
    return g


def boundary_points():
    pts = [[i, j, k] for i in (0.0, 1.0) for j in (0.0, 1.0) for k in (0.0, 1.0)]
    pts += [[0.0, 0.5, 1.0], [1.0, 0.3, 0.0], [0.5, 0.5, 0.5]]
    return np.array(pts, dtype=np.float64)


def test_default_config_matches_hand_derived_levels():
    cfg = HashGridConfig()
    assert cfg.output_dim == 32
    assert cfg.per_level_scale == pytest.approx(2 ** (7 / 15), rel=1e-14)
    # level 0: scale 15, 16 vertices, 16^3 = 4096 entries, dense
    assert cfg.level_scale(0) == pytest.approx(15.0)
    assert cfg.level_resolution(0) == 16 and cfg.level_table_size(0) == 4096
    # level 1: 16 b - 1 = 21.11 -> 23 vertices, 12167 -> 12168 (multiple of 8), dense
    assert cfg.level_resolution(1) == 23 and cfg.level_table_size(1) == 12168
    # level 3: 16 b^3 - 1 = 41.2 -> 43 vertices, 79507 > 65536 -> hashed
    assert [cfg.level_is_dense(l) for l in range(16)] == [True] * 3 + [False] * 13
    assert all(cfg.level_table_size(l) == 65536 for l in range(3, 16))
    paper = HashGridConfig(convention="paper")
    assert paper.level_scale(0) == 16 and paper.level_scale(15) == 2048


@pytest.mark.parametrize("convention", ["tcnn", "paper"])
def test_forward_matches_bruteforce_reference(convention):
    cfg = HashGridConfig(convention=convention)
    g = make_grid(cfg)
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.random((60, 3)), boundary_points()])
    table = g.table.detach().numpy()
    ref = ref_encode(x, table, cfg)
    xt = torch.from_numpy(x)
    out_fly = g(xt).detach().numpy()
    out_pre = g(lookup=g.precompute(xt)).detach().numpy()
    np.testing.assert_allclose(out_fly, ref, rtol=0, atol=1e-10)
    np.testing.assert_allclose(out_pre, ref, rtol=0, atol=1e-10)


def small_collision_cfg():
    # resolutions 2 -> 40 with only 2^6 entries: levels 0-1 dense, finer ones heavily hashed
    return HashGridConfig(n_levels=4, n_features_per_level=3, log2_hashmap_size=6, base_resolution=2,
                          max_resolution=40)


def test_hash_collisions_match_reference_values_and_gradients():
    cfg = small_collision_cfg()
    assert [cfg.level_is_dense(l) for l in range(4)] == [True, False, False, False]
    g = make_grid(cfg, seed=3)
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.random((200, 3)), boundary_points()])
    xt = torch.from_numpy(x)
    lookup = g.precompute(xt)
    # collisions exist: more distinct grid vertices than table entries at a hashed level
    # and repeated rows inside a single (point, level) bag
    assert any(len(set(r.tolist())) < 8 for r in lookup.indices[3])
    ref = ref_encode(x, g.table.detach().numpy(), cfg)
    upstream = rng.standard_normal(ref.shape)
    gref = ref_table_grad(x, cfg, g.table.shape[0], upstream)
    for path in ("fly", "lookup"):
        g.table.grad = None
        out = g(xt) if path == "fly" else g(lookup=lookup)
        np.testing.assert_allclose(out.detach().numpy(), ref, rtol=0, atol=1e-10)
        (out * torch.from_numpy(upstream)).sum().backward()
        np.testing.assert_allclose(g.table.grad.numpy(), gref, rtol=0, atol=1e-10, err_msg=path)


def test_table_gradient_default_config_matches_reference():
    cfg = HashGridConfig()
    g = make_grid(cfg, seed=4)
    rng = np.random.default_rng(5)
    x = rng.random((40, 3))
    xt = torch.from_numpy(x)
    up = rng.standard_normal((40, cfg.output_dim))
    gref = ref_table_grad(x, cfg, g.table.shape[0], up)
    for path in ("fly", "lookup"):
        g.table.grad = None
        out = g(xt) if path == "fly" else g(lookup=g.precompute(xt))
        (out * torch.from_numpy(up)).sum().backward()
        np.testing.assert_allclose(g.table.grad.numpy(), gref, rtol=0, atol=1e-10, err_msg=path)
    # a subset of the precomputed points (rows=): the reference on those points only
    rows = np.array([3, 17, 17, 0, 39, 22])
    gsub = ref_table_grad(x[rows], cfg, g.table.shape[0], up[rows])
    g.table.grad = None
    out = g(lookup=g.precompute(xt), rows=torch.from_numpy(rows))
    np.testing.assert_array_equal(out.detach().numpy(), g(lookup=g.precompute(xt)).detach().numpy()[rows])
    (out * torch.from_numpy(up[rows])).sum().backward()
    np.testing.assert_allclose(g.table.grad.numpy(), gsub, rtol=0, atol=1e-10, err_msg="rows")
    with pytest.raises(ValueError, match="needs lookup"):
        g(xt, rows=torch.from_numpy(rows))


def test_gradcheck_table_and_points_float64():
    cfg = HashGridConfig(n_levels=3, n_features_per_level=2, log2_hashmap_size=5, base_resolution=2,
                         max_resolution=9)
    g = make_grid(cfg, seed=6)
    torch.manual_seed(7)
    x = torch.rand(6, 3, dtype=torch.float64) * 0.9 + 0.05
    lookup = g.precompute(x)
    table = g.table.detach().clone().requires_grad_(True)

    def with_table(path):
        def f(t):  # route the gradcheck input in as the module's table
            return torch.func.functional_call(g, {"table": t}, args=(), kwargs=(
                {"x": x} if path == "fly" else {"lookup": lookup}))
        return f

    assert torch.autograd.gradcheck(with_table("fly"), (table,), eps=1e-6, atol=1e-8)
    assert torch.autograd.gradcheck(with_table("lookup"), (table,), eps=1e-6, atol=1e-8)
    # w.r.t. the points (trilinear weights are differentiable inside a cell)
    xg = x.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p: g(p), (xg,), eps=1e-7, atol=1e-7)


def test_precompute_equals_on_the_fly_float32_exactly():
    g = HashGrid()
    torch.manual_seed(8)
    x = torch.rand(3000, 3)
    lookup = g.precompute(x)
    a = g(x)
    b = g(lookup=lookup)
    assert torch.equal(a, b)
    ga = torch.autograd.grad(a.square().sum(), g.table)[0]
    gb = torch.autograd.grad(g(lookup=lookup).square().sum(), g.table)[0]
    # scatter-add vs sparse product: same terms, possibly different summation order
    torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-12)


def test_index_ranges_weights_and_boundaries():
    cfg = HashGridConfig()
    g = HashGrid(cfg, dtype=torch.float64)
    rng = np.random.default_rng(9)
    x = torch.from_numpy(np.concatenate([rng.random((500, 3)), boundary_points()]))
    lk = g.precompute(x)
    assert lk.indices.dtype == torch.int64 and lk.indices.shape == (16, len(x), 8)
    assert lk.weights.shape == (16, len(x), 8)
    for l in range(cfg.n_levels):
        assert int(lk.indices[l].min()) >= 0 and int(lk.indices[l].max()) < cfg.level_table_size(l)
    torch.testing.assert_close(lk.weights.sum(-1), torch.ones(16, len(x), dtype=torch.float64))
    assert bool((lk.weights >= 0).all())
    # at x = 0 (tcnn) pos = 0.5 exactly: the weights split evenly along every axis
    origin = g.precompute(torch.zeros(1, 3, dtype=torch.float64))
    torch.testing.assert_close(origin.weights, torch.full((16, 1, 8), 0.125, dtype=torch.float64))
    # dense levels at the far corner (1,1,1): the reference's corner rows, including
    # tcnn's wrap-around of the out-of-grid upper corner (coordinate == res)
    i_far = len(x) - len(boundary_points()) + 7
    assert x[i_far].tolist() == [1.0, 1.0, 1.0]
    for l in range(3):
        ref_rows = [r for r, _ in ref_corners([1.0, 1.0, 1.0], cfg)[l]]
        assert (lk.indices[l, i_far] + lk.offsets[l]).tolist() == ref_rows
    # points outside [0,1] are clamped to the border
    out_in = g(torch.tensor([[0.0, 1.0, 0.3]], dtype=torch.float64))
    out_out = g(torch.tensor([[-0.2, 1.7, 0.3]], dtype=torch.float64))
    assert torch.equal(out_in, out_out)
    assert bool(torch.isfinite(g(x)).all())


def test_lookup_checks_and_init():
    g = HashGrid()
    assert float(g.table.detach().abs().max()) <= 1e-4
    other = HashGrid(HashGridConfig(log2_hashmap_size=14))
    lk = other.precompute(torch.rand(5, 3))
    with pytest.raises(ValueError):
        g(lookup=lk)
    with pytest.raises(ValueError):
        g()
    with pytest.raises(ValueError):
        g(torch.rand(5, 2))


def test_normalize_to_bbox():
    lo = torch.tensor([-1.0, 0.0, 2.0], dtype=torch.float64)
    hi = torch.tensor([1.0, 4.0, 3.0], dtype=torch.float64)
    pts = torch.stack([lo, hi, (lo + hi) / 2])
    u = normalize_to_bbox(pts, lo, hi, padding=0.1)
    torch.testing.assert_close(u[0], torch.full((3,), 0.1 / 1.2, dtype=torch.float64))
    torch.testing.assert_close(u[1], torch.full((3,), 1.1 / 1.2, dtype=torch.float64))
    torch.testing.assert_close(u[2], torch.full((3,), 0.5, dtype=torch.float64))


@pytest.mark.gpu
def test_tcnn_matches_pure_torch():
    if not cuda_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("tinycudann")
    from fmgs.trainer.models.hashgrid import TcnnHashGrid

    cfg = HashGridConfig()
    t = TcnnHashGrid(cfg).cuda()
    p = HashGrid(cfg, device="cuda")
    with torch.no_grad():
        t.encoding.params.copy_(p.table.reshape(-1).to(t.encoding.params.dtype))
    x = torch.rand(4096, 3, device="cuda")
    torch.testing.assert_close(t(x), p(x), rtol=1e-3, atol=1e-6)
