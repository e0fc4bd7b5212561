"""The full FMGS-Avatar training objective (eq. 13-21), grouped for coordinated training.

:func:`full_loss_groups` returns the loss terms of one iteration grouped as
:mod:`fmgs.trainer.coordinated` expects:

=============  ===========================================================  ==================
group          terms (weights in ``loss.*`` of the config)                  may not update
=============  ===========================================================  ==================
photometric    (1-l) L1 + l D-SSIM (eq. 13) + lambda_mask BCE (eq. 14)      --
depth          lambda_depth * ordinal ranking vs the depth prior (eq. 15-16)  rotations
normal         lambda_sn L_sn + lambda_n L_n + lambda_tv L_tv (eq. 17-18)    positions
semantic_field lambda_sem * CE vs the parts prior (eq. 19), logits composited  all but the
               with constant weights (default, train.semantic_weights_only)   semantic logits
semantic       the same with train.semantic_weights_only=false (Sec. 4.5)     positions, rotations
regularisers   lambda_reg eq. 20 + lambda_skin L_skin + lambda_iso L_iso     --
=============  ===========================================================  ==================

A prior modality that is absent (None) simply leaves its group out. Default weights
(``assets/configs/default.yaml``, ``loss`` section) follow 2DGS for the normal terms
(0.05) and 3DGS-Avatar for mask (0.1), skinning (10 -> 0.1 after 1k iterations) and
isometry (1 on positions); the paper gives no values for depth and semantics, so those
are set to the same order as the normal terms (documented there).
"""
from __future__ import annotations

import torch
from omegaconf import DictConfig

from fmgs.trainer.fields import sample_mesh_surface, skinning_regulariser, skinning_weight_schedule
from fmgs.trainer.losses import (
    depth_ranking_loss, isometry_loss, mask_bce_loss, normal_consistency_loss, normal_from_depth,
    normal_prior_loss, normal_tv_loss, photometric_loss, semantic_ce_loss, semantic_feature_consistency,
)


def semantic_weights_only(cfg: DictConfig) -> bool:
    """Whether the semantic losses reach the semantic field only (``train.coordinated`` and
    ``train.semantic_weights_only``; see :mod:`fmgs.trainer.coordinated`)."""
    return bool(cfg.train.coordinated) and bool(cfg.train.get("semantic_weights_only", False))


def full_loss_groups(cfg, out, posed, model, frame, prior: dict | None, iteration: int,
                     generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Loss groups of one iteration of the full model.

    Args:
        cfg: run config (``train.lambda_ssim``, ``train.lambda_mask`` and the ``loss`` section).
        out: :class:`fmgs.trainer.rasterizer.RenderOutput` of ``posed`` (semantic logits in ``extras``).
        posed: :class:`fmgs.trainer.full_model.FullPosed`.
        model: the :class:`fmgs.trainer.full_model.FMGSAvatar` (skinning field, mesh buffers).
        frame: :class:`fmgs.trainer.data.Frame` (image, mask, camera).
        prior: the frame's priors from :func:`fmgs.priors.load_priors` (None: no priors).
        iteration: current iteration (skinning-weight schedule).
        generator: RNG for pixel pairs and surface samples.

    Returns:
        ``{group name: scalar loss}``; groups without data are omitted.
    """
    L = cfg.loss
    gt = torch.from_numpy(frame.image)
    mask = torch.from_numpy(frame.mask)
    groups = {"photometric": photometric_loss(out.rgb, gt, float(cfg.train.lambda_ssim))
              + float(cfg.train.lambda_mask) * mask_bce_loss(out.alpha, mask)}
    prior = prior or {}
    inside = mask > 0.5
    if prior.get("depth") is not None and L.lambda_depth > 0:
        groups["depth"] = float(L.lambda_depth) * depth_ranking_loss(
            out.depth, torch.from_numpy(prior["depth"]), inside, int(L.depth_pairs), alpha=float(L.depth_alpha),
            generator=generator)
    K = torch.as_tensor(frame.camera.K, dtype=out.depth.dtype)
    normal_terms = []
    if L.lambda_normal_consistency > 0:
        n_hat = normal_from_depth(out.depth, K)
        normal_terms.append(float(L.lambda_normal_consistency) * normal_consistency_loss(
            torch.nn.functional.normalize(out.normal, dim=-1), n_hat, inside.to(out.depth.dtype)))
    if prior.get("normal") is not None and L.lambda_normal_prior > 0:
        # NaN marks "no value" in the format (e.g. outside a body-model prior's silhouette):
        # only pixels inside the mask with a finite prior count, and NaN never enters the graph.
        pn = torch.from_numpy(prior["normal"])
        ok = inside & torch.isfinite(pn).all(-1)
        normal_terms.append(float(L.lambda_normal_prior) * normal_prior_loss(
            out.normal, torch.nan_to_num(pn, nan=0.0), ok))
    if L.lambda_normal_tv > 0:
        normal_terms.append(float(L.lambda_normal_tv) * normal_tv_loss(out.normal, inside))
    if normal_terms:
        groups["normal"] = sum(normal_terms)
    if prior.get("parts") is not None and out.extras is not None and L.lambda_semantic > 0:
        # Pixels the prior itself calls person (its mask, else parts > 0) and the image mask agrees.
        parts = torch.from_numpy(prior["parts"])
        prior_fg = torch.from_numpy(prior["mask"]) > 0.5 if prior.get("mask") is not None else parts > 0
        # With train.semantic_weights_only the logits were composited with constant weights,
        # so the loss can only reach the semantic field: it needs no restricted pass.
        name = "semantic_field" if semantic_weights_only(cfg) else "semantic"
        groups[name] = float(L.lambda_semantic) * semantic_ce_loss(out.extras, parts, inside & prior_fg)

    reg = []
    if posed.semantic_logits is not None and L.lambda_semantic_reg > 0:
        labels = posed.semantic_logits.argmax(-1).detach()
        reg.append(float(L.lambda_semantic_reg) * semantic_feature_consistency(
            posed.semantic_features, labels, normalization="pairs", generator=generator))
    if model.skinning_field is not None:
        w = skinning_weight_schedule(iteration, int(L.skinning_warmup), float(L.lambda_skinning_initial),
                                     float(L.lambda_skinning_final))
        pts, wts = sample_mesh_surface(model.mesh_verts, model.mesh_faces, model.mesh_skin_weights,
                                       int(L.skinning_samples), generator=generator)
        reg.append(w * skinning_regulariser(model.skinning_field, pts, wts, prior=model.cfg.skinning_prior))
    if L.lambda_isometry > 0:
        reg.append(float(L.lambda_isometry) * isometry_loss(posed.canonical_centers, posed.means,
                                                            model.neighbour_pairs))
    if reg:
        groups["regularisers"] = sum(reg)
    return groups
