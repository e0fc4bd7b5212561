"""Multiresolution hash encoding (Instant-NGP) in pure PyTorch, with precomputed lookups.

Source: T. Mueller et al., "Instant Neural Graphics Primitives with a Multiresolution
Hash Encoding", SIGGRAPH 2022 (the paper), and the conventions of tiny-cuda-nn's
``include/tiny-cuda-nn/encodings/grid.h`` (the CUDA reference implementation), which
3DGS-Avatar uses with 16 levels x 2 features, a 2^16 table and resolutions 16 -> 2048.

Conventions (``convention="tcnn"``, the default; matches tiny-cuda-nn's grid.h):

* per-level scale factor ``b = exp(ln(max_resolution / base_resolution) / (L - 1))``
  (3DGS-Avatar passes this as tcnn's ``per_level_scale``);
* level ``l`` has ``scale_l = base_resolution * b**l - 1`` and
  ``resolution_l = ceil(scale_l) + 1`` grid vertices per axis (tcnn: "base_resolution
  refers to the number of grid vertices rather than cells");
* a point ``x`` in [0, 1]^3 maps to ``pos = x * scale_l + 0.5``; the lower corner is
  ``floor(pos)`` and the trilinear fractions are ``pos - floor(pos)`` (tcnn uses one
  fused ``fmaf``; here it is a multiply then an add, which can differ by one rounding);
* corner ``c`` (0..7) takes offset bit ``d`` of ``c`` along axis ``d`` (x is bit 0);
* a level stores ``T_l = min(next_multiple_of_8(resolution_l**3), 2**log2_hashmap_size)``
  entries; if ``resolution_l**3 <= T_l`` the level is dense with index
  ``i = cx + cy * res + cz * res**2``, otherwise it is hashed with
  ``(cx * 1) XOR (cy * 2654435761) XOR (cz * 805459861)`` in uint32 arithmetic; the
  index is then taken modulo ``T_l``. Because of the half-cell offset the upper
  corner reaches coordinate ``res`` for x close to 1 (tcnn sizes the grid as
  ``ceil(scale) + 1`` vertices); like tcnn, that dense index wraps into the next
  row, or past the end and modulo ``T_l``, instead of being clamped;
* the parameters are one ``(sum_l T_l, F)`` table, levels stacked in order, so that
  ``table.reshape(-1)`` has tcnn's flat parameter layout;
* the output is ``(N, L * F)`` with column ``l * F + f`` (level-major, as tcnn).

``convention="paper"`` instead uses the paper's ``N_l = floor(base_resolution * b**l)``
with ``pos = x * N_l`` (no half-cell offset) and ``N_l + 1`` vertices per axis; the
indexing, hashing and table layout are the same.

Scales are computed in float64 on the host and cast to the points' dtype (tcnn
computes them in float32 with ``exp2f``; the two can differ in the last float32 bit,
which matters only for points that land exactly on a cell boundary, and can change
``ceil(scale)`` -- hence the vertex count -- of a level whose scale is within one ulp
of an integer, e.g. the finest default level, 2047; that level is hashed, where the
vertex count plays no role). Inputs outside [0, 1] are clamped to [0, 1]
(tcnn does not clamp; callers should normalise with :func:`normalize_to_bbox`).

The canonical surfel centres of FMGS-Avatar never move, so :meth:`HashGrid.precompute`
computes the corner indices and trilinear weights once and :meth:`HashGrid.forward`
with ``lookup=`` only gathers and weights table rows (one fused ``embedding_bag``);
its backward is one sparse product with the lookup's cached transposed weight matrix
(:meth:`HashLookup.transposed_csr`). Only first-order gradients are implemented.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "HASH_PRIMES",
    "HashGridConfig",
    "HashLookup",
    "HashGrid",
    "TcnnHashGrid",
    "normalize_to_bbox",
]

#: Spatial-hash primes of the Instant-NGP paper / tcnn's ``coherent_prime_hash`` (3-D).
HASH_PRIMES: tuple[int, int, int] = (1, 2654435761, 805459861)


@dataclass(frozen=True)
class HashGridConfig:
    """Hyper-parameters of a 3-D multiresolution hash grid.

    Defaults are 3DGS-Avatar's (16 levels x 2 features, 2^16 entries per level,
    resolutions 16 -> 2048), giving a 32-d feature per point.

    Attributes:
        n_levels: number of resolution levels ``L``.
        n_features_per_level: features per level ``F``.
        log2_hashmap_size: log2 of the maximum number of entries ``T`` per level.
        base_resolution: coarsest resolution ``N_min``.
        max_resolution: finest resolution ``N_max``.
        convention: ``"tcnn"`` (tiny-cuda-nn grid.h, default) or ``"paper"``; see the
            module docstring.
    """

    n_levels: int = 16
    n_features_per_level: int = 2
    log2_hashmap_size: int = 16
    base_resolution: int = 16
    max_resolution: int = 2048
    convention: str = "tcnn"

    def __post_init__(self) -> None:
        if self.n_levels < 1 or self.n_features_per_level < 1:
            raise ValueError("n_levels and n_features_per_level must be >= 1")
        if not 1 <= self.log2_hashmap_size <= 31:
            raise ValueError("log2_hashmap_size must be in [1, 31]")
        if self.base_resolution < 1 or self.max_resolution < self.base_resolution:
            raise ValueError("need 1 <= base_resolution <= max_resolution")
        if self.convention not in ("tcnn", "paper"):
            raise ValueError(f"unknown convention {self.convention!r} (use 'tcnn' or 'paper')")

    @property
    def per_level_scale(self) -> float:
        """Growth factor ``b = exp(ln(N_max / N_min) / (L - 1))`` (1.0 for one level)."""
        if self.n_levels == 1:
            return 1.0
        return math.exp(math.log(self.max_resolution / self.base_resolution) / (self.n_levels - 1))

    @property
    def output_dim(self) -> int:
        """Width ``L * F`` of the encoding."""
        return self.n_levels * self.n_features_per_level

    def level_scale(self, level: int) -> float:
        """Multiplier applied to x in [0, 1] at ``level`` (float64).

        tcnn: ``base * b**l - 1``; paper: ``floor(base * b**l)``, floored with a 1e-6
        tolerance because ``16 * b**15`` evaluates to 2047.9999999999984 in float64
        and the finest level must have ``N_{L-1} = max_resolution``.
        """
        s = self.base_resolution * self.per_level_scale**level
        if self.convention == "tcnn":
            return s - 1.0
        return float(math.floor(s + 1e-6))

    def level_resolution(self, level: int) -> int:
        """Grid vertices per axis at ``level`` (tcnn: ``ceil(scale) + 1``; paper: ``N_l + 1``)."""
        return int(math.ceil(self.level_scale(level))) + 1

    def level_table_size(self, level: int) -> int:
        """Entries stored for ``level``: ``min(next_multiple_of_8(res**3), 2**log2_hashmap_size)``."""
        dense = self.level_resolution(level) ** 3
        dense = (dense + 7) // 8 * 8
        return min(dense, 1 << self.log2_hashmap_size)

    def level_is_dense(self, level: int) -> bool:
        """True when every grid vertex of ``level`` has its own entry (no hashing)."""
        return self.level_resolution(level) ** 3 <= self.level_table_size(level)

    def level_offsets(self) -> list[int]:
        """Start row of each level in the stacked table, plus the total (length ``L + 1``)."""
        offs = [0]
        for level in range(self.n_levels):
            offs.append(offs[-1] + self.level_table_size(level))
        return offs

    @property
    def tcnn_config(self) -> dict:
        """The equivalent ``tinycudann.Encoding`` configuration dictionary."""
        return {
            "otype": "HashGrid",
            "n_levels": self.n_levels,
            "n_features_per_level": self.n_features_per_level,
            "log2_hashmap_size": self.log2_hashmap_size,
            "base_resolution": self.base_resolution,
            "per_level_scale": self.per_level_scale,
            "interpolation": "Linear",
        }


@dataclass
class HashLookup:
    """Precomputed corner indices and trilinear weights for fixed points.

    Attributes:
        indices: ``(L, N, 8)`` int64, row of each corner within its level's table
            (in ``[0, T_l)``).
        weights: ``(L, N, 8)`` float (the dtype of the points), trilinear weights;
            they sum to 1 over the corners.
        offsets: ``(L,)`` int64, first row of each level in the stacked table.
        table_sizes: ``T_l`` per level (to check the lookup fits a grid).
        flat_indices: ``(N * L, 8)`` int64, rows in the stacked table, ordered
            point-major then level (what :meth:`HashGrid.forward` gathers); derived.
        flat_weights: ``(N * L, 8)`` float, the weights in the same order; derived.
    """

    indices: torch.Tensor
    weights: torch.Tensor
    offsets: torch.Tensor
    table_sizes: tuple[int, ...]
    flat_indices: torch.Tensor = field(init=False, repr=False)
    flat_weights: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        n_levels = self.indices.shape[0]
        glob = self.indices + self.offsets.view(n_levels, 1, 1).to(self.indices.device)
        self.flat_indices = glob.transpose(0, 1).reshape(-1, 8).contiguous()
        self.flat_weights = self.weights.transpose(0, 1).reshape(-1, 8).contiguous()
        self._csr_t: torch.Tensor | None = None

    def transposed_csr(self, dtype: torch.dtype) -> torch.Tensor:
        """Sparse CSR ``(sum_l T_l, N * L)`` matrix ``A^T`` with ``out_bags = A @ table``.

        Built once (a stable sort of the corner rows) and cached; the table gradient
        is then one sparse-dense product ``A^T @ grad_out``, several times faster on
        CPU than a scatter-add. Duplicate (row, bag) entries from hash collisions
        inside one bag are kept and summed by the product.
        """
        if self._csr_t is None or self._csr_t.dtype != dtype:
            n_rows = sum(self.table_sizes)
            cols = self.flat_indices.reshape(-1)
            order = torch.argsort(cols, stable=True)
            bag = torch.div(order, 8, rounding_mode="floor")
            counts = torch.bincount(cols, minlength=n_rows)
            crow = torch.zeros(n_rows + 1, dtype=torch.int64, device=cols.device)
            crow[1:] = torch.cumsum(counts, 0)
            vals = self.flat_weights.reshape(-1)[order].to(dtype)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
                self._csr_t = torch.sparse_csr_tensor(
                    crow, bag, vals, size=(n_rows, self.flat_indices.shape[0]), check_invariants=False
                )
        return self._csr_t

    @property
    def n_points(self) -> int:
        """Number of points ``N``."""
        return self.indices.shape[1]

    def to(self, device=None, dtype: torch.dtype | None = None) -> "HashLookup":
        """Copy to ``device`` and/or cast the weights to floating ``dtype``."""
        w = self.weights.to(device=device, dtype=dtype)
        return HashLookup(self.indices.to(device), w, self.offsets.to(device), self.table_sizes)

    def apply(self, fn) -> "HashLookup":
        """A new lookup with ``fn`` applied to its stored tensors (indices, weights, offsets),
        as :meth:`torch.nn.Module._apply` applies a ``.to()`` / ``.cuda()`` / ``.double()`` move
        to buffers; the derived flat tensors and the CSR cache are rebuilt where they land."""
        return HashLookup(fn(self.indices), fn(self.weights), fn(self.offsets), self.table_sizes)


class _WeightedGather(torch.autograd.Function):
    """``out[b] = sum_k w[b, k] * table[idx[b, k]]`` for bags ``b`` (first-order autograd only).

    Forward: one fused ``embedding_bag``. Backward: table gradient by a cached sparse
    product (precomputed lookups) or ``index_add_`` (on-the-fly), and the weight
    gradient ``<grad_out[b], table[idx[b, k]]>`` when the weights need one.
    """

    @staticmethod
    def forward(ctx, table, idx, w, lookup):
        # a detached table takes embedding_bag's forward-only kernel: the training kernel
        # also builds offset2bag etc. for its own backward, which this Function replaces
        out = F.embedding_bag(idx, table.detach(), per_sample_weights=w.detach(), mode="sum")
        ctx.save_for_backward(table, idx, w)
        ctx.lookup = lookup
        return out

    @staticmethod
    def backward(ctx, grad_out):
        table, idx, w = ctx.saved_tensors
        grad_table = grad_w = None
        if ctx.needs_input_grad[0]:
            if ctx.lookup is not None:
                grad_table = ctx.lookup.transposed_csr(grad_out.dtype) @ grad_out
            else:
                contrib = (grad_out.unsqueeze(1) * w.unsqueeze(-1)).reshape(-1, grad_out.shape[-1])
                grad_table = torch.zeros_like(table).index_add_(0, idx.reshape(-1), contrib)
        if ctx.needs_input_grad[2]:
            vals = table.index_select(0, idx.reshape(-1)).view(*idx.shape, table.shape[-1])
            grad_w = (vals * grad_out.unsqueeze(1)).sum(-1)
        return grad_table, None, grad_w, None


def normalize_to_bbox(
    x: torch.Tensor, bbox_min: torch.Tensor, bbox_max: torch.Tensor, padding: float = 0.1
) -> torch.Tensor:
    """Map points into [0, 1]^3 relative to a padded axis-aligned bounding box.

    The box is enlarged by ``padding`` times its extent on each side, per axis:
    ``lo = min - padding * (max - min)``, ``hi = max + padding * (max - min)``, and
    ``(x - lo) / (hi - lo)`` is returned (not clamped; :class:`HashGrid` clamps).
    This follows 3DGS-Avatar's habit of normalising canonical points to a padded
    canonical bounding box before the hash encoding.

    Args:
        x: ``(..., 3)`` points, metres.
        bbox_min, bbox_max: ``(3,)`` box corners, metres (tensors or sequences).
        padding: fraction of the extent added on each side (>= 0).

    Returns:
        ``(..., 3)`` tensor of the same dtype as ``x``, in [0, 1] inside the padded box.
    """
    lo = torch.as_tensor(bbox_min, dtype=x.dtype, device=x.device)
    hi = torch.as_tensor(bbox_max, dtype=x.dtype, device=x.device)
    ext = hi - lo
    if bool((ext <= 0).any()):
        raise ValueError("bbox_max must exceed bbox_min on every axis")
    lo = lo - padding * ext
    hi = hi + padding * ext
    return (x - lo) / (hi - lo)


class HashGrid(nn.Module):
    """Pure-PyTorch multiresolution hash encoding (Instant-NGP, tcnn grid.h conventions).

    Args:
        cfg: the grid configuration (defaults: 16 x 2 features, 2^16, 16 -> 2048).
        dtype: parameter dtype (float32 for training; float64 for tests).
        device: parameter device.

    Attributes:
        table: ``(sum_l T_l, F)`` parameter, initialised uniform(-1e-4, 1e-4) as
            Instant-NGP / tcnn; ``table.reshape(-1)`` is tcnn's flat layout.

    Call ``forward(x)`` for arbitrary (moving) points or ``precompute(x)`` once and
    ``forward(lookup=...)`` for fixed ones; both give identical results.
    """

    def __init__(
        self,
        cfg: HashGridConfig | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg or HashGridConfig()
        c = self.cfg
        offs = c.level_offsets()
        self.table = nn.Parameter(
            torch.empty(offs[-1], c.n_features_per_level, dtype=dtype, device=device).uniform_(-1e-4, 1e-4)
        )
        L = c.n_levels
        self.table_sizes = tuple(c.level_table_size(l) for l in range(L))
        self.register_buffer("_offsets", torch.tensor(offs[:-1], dtype=torch.int64, device=device), persistent=False)
        self.register_buffer(
            "_scales", torch.tensor([c.level_scale(l) for l in range(L)], dtype=torch.float64, device=device),
            persistent=False,
        )
        self.register_buffer(
            "_res", torch.tensor([c.level_resolution(l) for l in range(L)], dtype=torch.int64, device=device),
            persistent=False,
        )
        # corner offsets (8, 3): bit d of the corner number is the offset along axis d
        dense = [c.level_is_dense(l) for l in range(L)]
        if any(dense[i] < dense[i + 1] for i in range(L - 1)):
            raise AssertionError("dense levels must form a prefix")  # resolutions increase with l
        self._n_dense = sum(dense)
        corners = torch.tensor([[(k >> d) & 1 for d in range(3)] for k in range(8)], dtype=torch.int64)
        self.register_buffer("_corners", corners.to(device), persistent=False)
        primes = torch.tensor(HASH_PRIMES, dtype=torch.int64)
        self.register_buffer("_primes", primes.to(device), persistent=False)

    @property
    def output_dim(self) -> int:
        """Width ``L * F`` of the encoding."""
        return self.cfg.output_dim

    def extra_repr(self) -> str:
        c = self.cfg
        return (
            f"levels={c.n_levels}, features={c.n_features_per_level}, T=2^{c.log2_hashmap_size}, "
            f"res={c.base_resolution}->{c.max_resolution}, convention={c.convention}"
        )

    def _corner_lookup(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Level-local corner rows ``(L, N, 8)`` int64 and weights ``(L, N, 8)`` (x's dtype).

        Corner ``k = 4 * bz + 2 * by + bx``. Differentiable w.r.t. ``x`` through the weights.
        Per-axis terms are formed first (``(L, N, 3, 2)``) and combined by broadcasting,
        which keeps the largest intermediate at ``(L, N, 8)``.
        """
        if x.dim() != 2 or x.shape[1] != 3:
            raise ValueError(f"expected points of shape (N, 3), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError("points must be floating point")
        L = self.cfg.n_levels
        x = x.clamp(0.0, 1.0)
        scales = self._scales.to(x.dtype).view(L, 1, 1)
        offset = 0.5 if self.cfg.convention == "tcnn" else 0.0
        pos = x.unsqueeze(0) * scales + offset  # (L, N, 3)
        base = torch.floor(pos)
        frac = pos - base  # (L, N, 3), differentiable w.r.t. x
        grid = base.detach().to(torch.int64)  # (L, N, 3)
        g2 = torch.stack([grid, grid + 1], dim=-1)  # (L, N, 3, 2): low / high vertex per axis
        w2 = torch.stack([1 - frac, frac], dim=-1)  # (L, N, 3, 2)

        def combine(t: torch.Tensor, op) -> torch.Tensor:
            # (L, N, 3, 2) -> (L, N, 8) with k = 4*bz + 2*by + bx
            tx, ty, tz = t[:, :, 0], t[:, :, 1], t[:, :, 2]
            return op(op(tz[:, :, :, None, None], ty[:, :, None, :, None]), tx[:, :, None, None, :]).reshape(
                t.shape[0], t.shape[1], 8
            )

        w = combine(w2, torch.mul)
        # Levels get finer with l, so the dense levels form a prefix [0, n_dense).
        n_dense = int(self._n_dense)
        parts = []
        if n_dense > 0:
            res = self._res[:n_dense].view(n_dense, 1)
            stride = torch.stack([torch.ones_like(res), res, res * res], dim=-1).view(n_dense, 1, 3, 1)
            # The half-cell offset lets the upper corner reach coordinate ``res`` near
            # x = 1; as in tcnn that index runs into the next row / past the end and
            # is wrapped by ``% T_l`` (an aliasing of tcnn's we reproduce on purpose).
            sizes = torch.tensor(self.table_sizes[:n_dense], dtype=torch.int64, device=g2.device)
            parts.append(torch.remainder(combine(g2[:n_dense] * stride, torch.add), sizes.view(n_dense, 1, 1)))
        if n_dense < L:
            # Hashed levels have T_l = 2**log2_hashmap_size, which divides 2**32, so
            # (uint32 hash) mod T_l == XOR of the per-axis (coord * prime) mod T_l.
            mask = (1 << self.cfg.log2_hashmap_size) - 1
            hashed = (g2[n_dense:] * self._primes.view(1, 1, 3, 1)) & mask
            parts.append(combine(hashed, torch.bitwise_xor))
        idx = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        return idx, w

    def precompute(self, x: torch.Tensor) -> HashLookup:
        """Corner rows and trilinear weights for fixed points (e.g. canonical surfel centres).

        Args:
            x: ``(N, 3)`` float points in [0, 1]^3 (see :func:`normalize_to_bbox`).

        Returns:
            A :class:`HashLookup` (computed without autograd; weights in ``x``'s dtype).
        """
        with torch.no_grad():
            idx, w = self._corner_lookup(x)
        return HashLookup(idx, w, self._offsets.clone(), self.table_sizes)

    def forward(self, x: torch.Tensor | None = None, lookup: HashLookup | None = None,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """Encode points.

        Args:
            x: ``(N, 3)`` float points in [0, 1]^3 (clamped), computed on the fly;
                differentiable w.r.t. ``x`` and the table.
            lookup: a :class:`HashLookup` from :meth:`precompute`; only gathers and
                weights (differentiable w.r.t. the table). Give exactly one of the two.
            rows: with ``lookup`` only: ``(M,)`` int64 indices of the lookup's points to
                encode (the others are not gathered; the table gradient is then an
                ``index_add`` instead of the cached sparse product).

        Raises:
            ValueError: both or neither of ``x`` / ``lookup``; ``rows`` without ``lookup``;
                a lookup made for other table sizes.

        Returns:
            ``(N, L * F)`` (``(M, L * F)`` with ``rows``) features in the table's dtype,
            column ``l * F + f``.
        """
        if (x is None) == (lookup is None):
            raise ValueError("give exactly one of x or lookup")
        if rows is not None and lookup is None:
            raise ValueError("rows selects points of a precomputed lookup; it needs lookup, not x")
        if lookup is None:
            idx, w = self._corner_lookup(x)
            n = x.shape[0]
            flat_idx = (idx + self._offsets.view(-1, 1, 1)).transpose(0, 1).reshape(-1, 8)
            flat_w = w.transpose(0, 1).reshape(-1, 8)
        else:
            if tuple(lookup.table_sizes) != self.table_sizes:
                raise ValueError("lookup was precomputed for a grid with different table sizes")
            n = lookup.n_points
            flat_idx, flat_w = lookup.flat_indices, lookup.flat_weights
            if rows is not None:
                L = len(self.table_sizes)
                flat_idx = flat_idx.view(n, L, 8).index_select(0, rows).reshape(-1, 8)
                flat_w = flat_w.view(n, L, 8).index_select(0, rows).reshape(-1, 8)
                n = int(rows.numel())
                lookup = None          # the cached CSR describes all points: scatter instead
        if flat_w.dtype != self.table.dtype:
            flat_w = flat_w.to(self.table.dtype)
        # fused gather + weighted sum over the 8 corners of each (point, level) bag
        out = _WeightedGather.apply(self.table, flat_idx, flat_w, lookup)
        return out.view(n, self.cfg.output_dim)


class TcnnHashGrid(nn.Module):
    """``tinycudann.Encoding`` wrapped with :class:`HashGrid`'s interface (CUDA only).

    The CUDA reference that :class:`HashGrid`'s tcnn conventions are checked against on a GPU
    (``tests/test_hashgrid.py``, ``benchmarks/gpu_check.sh``). The models use :class:`HashGrid`
    everywhere: their lookups at the fixed canonical centres are precomputed once, which tcnn
    cannot reuse. ``precompute`` only stores the points; ``forward(x=None, lookup=None)``
    returns ``(N, L * F)`` float32.
    """

    def __init__(self, cfg: HashGridConfig | None = None) -> None:
        super().__init__()
        import tinycudann as tcnn  # optional dependency, imported lazily

        self.cfg = cfg or HashGridConfig()
        if self.cfg.convention != "tcnn":
            raise ValueError("the tinycudann back-end only supports convention='tcnn'")
        try:
            self.encoding = tcnn.Encoding(3, self.cfg.tcnn_config, dtype=torch.float32)
        except TypeError:  # older tinycudann without the dtype argument
            self.encoding = tcnn.Encoding(3, self.cfg.tcnn_config)

    @property
    def output_dim(self) -> int:
        """Width ``L * F`` of the encoding."""
        return self.cfg.output_dim

    def precompute(self, x: torch.Tensor) -> torch.Tensor:
        """Return the clamped points themselves (the "lookup" of this back-end)."""
        return x.detach().clamp(0.0, 1.0).contiguous()

    def forward(self, x: torch.Tensor | None = None, lookup: torch.Tensor | None = None) -> torch.Tensor:
        """Encode ``x`` (or the points stored in ``lookup``): ``(N, 3)`` -> ``(N, L * F)`` float32."""
        if (x is None) == (lookup is None):
            raise ValueError("give exactly one of x or lookup")
        pts = lookup if x is None else x.clamp(0.0, 1.0)
        return self.encoding(pts).float()
