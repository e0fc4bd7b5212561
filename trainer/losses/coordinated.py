"""Coordinated training strategy of FMGS-Avatar (paper Sec. 4.5), in one place.

The paper: "(1) depth losses block gradients to Gaussian rotation parameters ... (2)
normal losses block gradients to Gaussian position parameters ... (3) semantic losses
block gradients to both position and rotation parameters".

What exactly is isolated here
-----------------------------
The isolation acts on the **rasteriser-input tensors** -- the per-surfel tensors handed
to :func:`fmgs.trainer.render.dispatch.rasterize_surfels`: ``means (S,3)``, ``rotations
(S,3,3)``, ``scales (S,2)``, ``opacities (S,)``, ``colors (S,3)`` and ``extras (S,E)``
(the semantic logits). For a loss group ``g`` with blocked set ``B_g``
(:data:`BLOCKED`), the gradient that reaches the model is

    dL_g/dtheta = sum_{x not in B_g} (dL_g/dx) (dx/dtheta),

i.e. exactly what ``rasterize_surfels(..., x.detach() for x in B_g ...)`` would give for
that group alone, but with ONE render shared by all groups. Consequences for the model
(:class:`fmgs.trainer.models.full.FMGSAvatar`):

* depth group: nothing reaches the posed rotations ``R_o``; so the geometry field's
  rotation residual ``delta_r`` (which only feeds ``R_o``) gets exactly zero. Model
  parameters that feed both ``mu_o`` and ``R_o`` (skinning field, pose correction,
  geometry MLP trunk, ``delta_d`` through the skinning weights) still get the part of
  the depth gradient that flows through the positions ``mu_o`` -- that is the point.
* normal group: nothing reaches ``mu_o``; ``delta_d`` (eq. 4) gets exactly zero when it
  feeds only ``mu_o``, i.e. when the skinning field is off or queried with
  ``mu'.detach()`` (``FullModelConfig.detach_skinning_query``). Otherwise ``delta_d``
  keeps the second-order path ``delta_d -> mu' -> W(mu') -> T -> R_o`` (a surfel that
  moves in canonical space changes its skinning weights and hence its posed
  orientation): the normal loss then moves positions only through orientations.
* semantic group: neither ``mu_o`` nor ``R_o``; scales, opacities and the semantic
  logits (``extras``) still learn from it.
* ``semantic_field`` group (the default, ``train.semantic_weights_only``; our deviation,
  stronger than the paper's rule): the semantic logits are composited with the blending
  weights held constant (``rasterize_surfels(extras_weights_only=True)``), so the
  semantic losses reach the semantic field only -- not the scales and opacities either.
  Reason: the part labels we train with are those of the naked SMPL fit (body-model
  priors); through opacities and scales they pulled the clothed silhouette towards the
  naked body (-0.24 dB held-out in the 256^2 ablation). It also saves a rasteriser
  backward pass per iteration (docs/benchmarks.md). ``train.semantic_weights_only=false``
  restores the paper's literal rule.
* photometric / mask (and the regularisers): everything.

Requirements: the render inputs are computed "in parallel" (none is computed from
another -- true for both avatar models), and a restricted group's losses reach the
model only through the render inputs (true for the rendered depth / normal / semantic
losses). Losses that touch model tensors directly -- the semantic feature consistency
(eq. 20, on ``f_s``), the skinning and isometry regularisers -- go into an unrestricted
group (``'regularisers'`` or ``'photometric'``): restricted groups are differentiated
only w.r.t. the render inputs, so any other path of theirs would be dropped.

Cost
----
``coordinated_backward(mode='fast')`` (default): unrestricted groups are not
differentiated separately -- their loss enters the final backward directly; each
*distinct* blocked set among the present groups costs one extra
``torch.autograd.grad`` through the loss and the rasteriser backward only (it stops
at the render inputs, never enters the model), restricted to the inputs that group
may reach. Absent groups (None, plain numbers, losses without a graph) cost nothing.
One backward through the model then takes the summed input gradients.
``mode='reference'`` is the textbook version (one ``autograd.grad`` per group w.r.t.
all its allowed inputs, including the photometric one, then
``torch.autograd.backward(inputs, grads)``); it is kept for checking and timing, and
is only valid when every loss reaches the model through the render inputs.
Works with any rasteriser back-end that is differentiable with autograd (CPU, gsplat).
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

__all__ = ["RENDER_INPUTS", "BLOCKED", "coordinated_backward"]

#: Names of the rasteriser-input tensors (keys of ``render_inputs``).
RENDER_INPUTS: tuple[str, ...] = ("means", "rotations", "scales", "opacities", "colors", "extras")

#: Blocked rasteriser inputs per loss group (Sec. 4.5). Groups with an empty set are
#: unrestricted: 'photometric' (eq. 13 + mask eq. 14), 'regularisers' (eq. 20, L_skin,
#: L_iso and anything else that does not go through the rasteriser).
BLOCKED: dict[str, frozenset[str]] = {
    "photometric": frozenset(),
    "regularisers": frozenset(),
    "depth": frozenset({"rotations"}),
    "normal": frozenset({"means"}),
    "semantic": frozenset({"means", "rotations"}),
    # semantic losses on logits composited with constant weights
    # (``rasterize_surfels(extras_weights_only=True)``, ``train.semantic_weights_only``): their
    # only path is the semantic logits, so no restricted pass is needed
    "semantic_field": frozenset(),
}


def _present(loss) -> bool:
    return isinstance(loss, Tensor) and loss.requires_grad


def coordinated_backward(
    render_inputs: Mapping[str, Tensor],
    loss_groups: Mapping[str, Tensor | float | None],
    enabled: bool = True,
    blocked: Mapping[str, frozenset[str] | set[str]] | None = None,
    mode: str = "fast",
    retain_graph: bool = False,
) -> dict:
    """Backpropagate the loss groups with the Sec. 4.5 gradient stops (accumulates into
    ``.grad`` like ``loss.backward()``; call ``optimizer.zero_grad()`` before).

    With ``enabled=False`` this is ``sum(loss_groups.values()).backward()``.

    With ``enabled=True``, for every restricted group ``g`` (non-empty ``blocked[g]``),
    ``G_g[x] = dL_g/dx`` is computed for its allowed render inputs ``x`` only
    (``torch.autograd.grad(..., retain_graph=True)``; groups with the same blocked set
    are summed first), and the final backward is
    ``torch.autograd.backward([L_free] + xs, [1] + [sum_g G_g[x] for x in xs])`` with
    ``L_free`` the sum of the unrestricted groups. The model therefore receives
    ``sum_g sum_{x not in blocked[g]} (dL_g/dx)(dx/dtheta)``.

    Args:
        render_inputs: the rasteriser-input tensors by name (subset of
            :data:`RENDER_INPUTS`, e.g. ``FullPosed.render_inputs()``), exactly the
            tensor objects passed to the rasteriser (so they are nodes of the graph).
        loss_groups: scalar loss per group name (keys of ``blocked``); a value may be
            None or a plain number (skipped).
        enabled: apply the strategy (False: plain backward of the sum).
        blocked: blocked-input table (default :data:`BLOCKED`).
        mode: ``'fast'`` (default) or ``'reference'`` (see the module docstring).
        retain_graph: keep the graph after the final backward (as ``Tensor.backward``),
            e.g. to backpropagate the same render again.

    Returns:
        ``{"total": float (sum of the losses), "grad_passes": int (autograd.grad calls),
        "groups": list of the groups that contributed}``.

    Raises:
        KeyError: a group name not in ``blocked`` or a blocked input name not in
            :data:`RENDER_INPUTS`.
        ValueError: unknown ``mode``; nothing to backpropagate.
    """
    table = BLOCKED if blocked is None else blocked
    for name in loss_groups:
        if name not in table:
            raise KeyError(f"unknown loss group {name!r}; known: {sorted(table)}")
    for name, b in table.items():
        bad = set(b) - set(RENDER_INPUTS)
        if bad:
            raise KeyError(f"group {name!r} blocks unknown render inputs {sorted(bad)}")
    if mode not in ("fast", "reference"):
        raise ValueError(f"mode must be 'fast' or 'reference', got {mode!r}")
    present = {k: v for k, v in loss_groups.items() if _present(v)}
    total = float(sum(float(v.detach()) if isinstance(v, Tensor) else float(v)
                      for v in loss_groups.values() if v is not None))
    if not present:
        raise ValueError("no loss group has a graph to backpropagate")
    stats = {"total": total, "grad_passes": 0, "groups": sorted(present)}

    if not enabled:
        sum(present.values()).backward(retain_graph=retain_graph)
        return stats

    inputs = {k: v for k, v in render_inputs.items() if isinstance(v, Tensor) and v.requires_grad}
    acc: dict[str, Tensor] = {}

    def add_grads(loss: Tensor, allowed: list[str]) -> None:
        if not allowed:
            return
        grads = torch.autograd.grad(loss, [inputs[k] for k in allowed], retain_graph=True, allow_unused=True)
        stats["grad_passes"] += 1
        for k, g in zip(allowed, grads):
            if g is not None:
                acc[k] = g if k not in acc else acc[k] + g

    free: Tensor | None = None
    if mode == "fast":
        by_set: dict[frozenset, Tensor] = {}
        for name, loss in present.items():
            b = frozenset(table[name])
            if not b:
                free = loss if free is None else free + loss
            else:
                by_set[b] = loss if b not in by_set else by_set[b] + loss
        for b, loss in by_set.items():
            add_grads(loss, [k for k in inputs if k not in b])
    else:
        for name, loss in present.items():
            add_grads(loss, [k for k in inputs if k not in table[name]])

    tensors: list[Tensor] = []
    grads: list[Tensor | None] = []
    if free is not None:
        tensors.append(free)
        grads.append(None)
    for k, g in acc.items():
        tensors.append(inputs[k])
        grads.append(g)
    if tensors:
        torch.autograd.backward(tensors, grads, retain_graph=retain_graph)
    return stats
