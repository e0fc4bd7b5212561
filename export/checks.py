"""Checks built into ``fmgs-export``: ONNX Runtime parity and the skinning-bake error.

* :func:`parity_check` -- for real training poses of the run, each ONNX model is run in
  ONNX Runtime (CPU) on the very inputs the torch model sees inside its own forward
  (:meth:`FMGSAvatar.forward` / :meth:`SurfelAvatar.forward`), and its outputs are compared
  with the torch values (max abs error; must be < :data:`PARITY_TOL` in fp32). An
  end-to-end chain -- ORT models fed by each other, NumPy LBS with the *baked* skinning
  weights and NumPy view-direction canonicalisation, exactly what the runtime does
  (docs/bundle.md) -- is compared with the torch forward's posed centres and colours.
* :func:`skinning_bake_check` -- the error of the baked weights ``W(mu)`` against what the
  trained forward uses (exactly 0 for ``skinning_query=canonical``), and ``W(mu)`` against
  eq. 9 at the corrected centre ``mu'`` of each pose: max |dW| and the posed-centre
  displacement ``|sum_b dW_b B_b mu'|`` (mm) over training poses (with their learnt pose
  corrections).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fmgs.bundle import PLANAR
from fmgs.export.bake import Baked, LoadedRun, training_poses

#: fp32 parity tolerance (max abs error, any output).
PARITY_TOL = 1e-4


def make_session(path: str | Path, threads: int = 2, opt_level: str = "all"):
    """An ONNX Runtime CPU session.

    Args:
        path: ONNX file.
        threads: intra-op threads (the machine's cores; inter-op 1, sequential execution).
        opt_level: ``"disable" | "basic" | "extended" | "all"`` graph optimisation level.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[opt_level]
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _np(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().numpy().astype(np.float32))


def _err(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def numpy_lbs(W: np.ndarray, B: np.ndarray, centers: np.ndarray, rotations: np.ndarray):
    """Forward LBS in NumPy (eq. 10-12, as :func:`fmgs.trainer.models.fields.blend_lbs`).

    Args:
        W: ``(S, 24)`` skinning weights; B: ``(24, 4, 4)`` world-from-canonical bone
        transforms; centers: ``(S, 3)`` ``mu'`` (m); rotations: ``(S, 3, 3)`` ``R'``.

    Returns:
        ``(means (S,3), rotations (S,3,3), T (S,4,4))`` in the dtype of ``W``.
    """
    T = np.einsum("sb,bij->sij", W, B.astype(W.dtype))
    M = T[:, :3, :3]
    means = np.einsum("sij,sj->si", M, centers) + T[:, :3, 3]
    tu = np.einsum("sij,sj->si", M, rotations[:, :, 0])
    tv = np.einsum("sij,sj->si", M, rotations[:, :, 1])
    n = np.cross(tu, tv)
    n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)
    tu = tu / np.maximum(np.linalg.norm(tu, axis=1, keepdims=True), 1e-12)
    tv = np.cross(n, tu)
    return means, np.stack([tu, tv, n], -1), T


def canonical_view_dirs(means: np.ndarray, T: np.ndarray, camera_center: np.ndarray, mode: str) -> np.ndarray:
    """``d_hat`` for the colour model: ``d = normalize(mu_o - c)``, then ``normalize(inv(M) d)``
    (``mode="inverse"``, full model) or ``normalize(M^T d)`` (``"transpose"``, foundation)."""
    d = means - camera_center[None].astype(means.dtype)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    M = T[:, :3, :3]
    if mode == "inverse":
        dh = np.linalg.solve(M, d[..., None])[..., 0]
    else:
        dh = np.einsum("sji,sj->si", M, d)
    return dh / np.linalg.norm(dh, axis=1, keepdims=True)


def layout_feeds(input_names, feeds: dict) -> dict:
    """A graph's feeds from row-major arrays: input ``<name>_planar`` gets ``feeds[<name>]`` with
    the surfel axis moved last (contiguous float32); any other input gets ``feeds[name]`` as is.

    Args:
        input_names: the graph's input names (either layout).
        feeds: ``{row-major input name: array}``.
    Raises:
        KeyError: an input without a row-major array in ``feeds``.
    """
    return {n: np.ascontiguousarray(np.moveaxis(np.asarray(feeds[n[:-7]], np.float32), 0, -1))
            if n.endswith("_planar") else feeds[n] for n in input_names}


def run_rows(session, entry: dict, feeds: dict) -> dict[str, np.ndarray]:
    """Run one bundle graph on row-major feeds; row-major outputs under the row-major names.

    Graphs of either layout (:mod:`fmgs.export.onnx_export`): a planar graph's inputs
    ``<name>_planar`` are fed ``feeds[<name>]`` with the surfel axis moved last, and its
    outputs come back with the surfel axis first under the row-major names
    (``centers_out``, ``scales_out``, ``z_g``, ``colors``; ``t_u_planar_out`` and
    ``t_v_planar_out`` as ``rotations_out = [t_u, t_v, t_u x t_v]``), so one comparison
    serves both.

    Args:
        session: ONNX Runtime session of the graph.
        entry: its manifest entry (``layout`` read; absent = row-major).
        feeds: ``{row-major input name: array}``.
    Returns:
        ``{output name: float32 array}``.
    """
    names = [o.name for o in session.get_outputs()]
    outs = dict(zip(names, session.run(None, layout_feeds([i.name for i in session.get_inputs()], feeds))))
    if entry.get("layout") != PLANAR:
        return outs
    outs = {n: np.moveaxis(a, -1, 0) for n, a in outs.items()}
    rows = {n.replace("_planar", ""): np.ascontiguousarray(a) for n, a in outs.items() if not n.startswith("t_")}
    if "t_u_planar_out" in outs:
        tu, tv = outs["t_u_planar_out"], outs["t_v_planar_out"]
        rows["rotations_out"] = np.stack([tu, tv, np.cross(tu, tv)], -1).astype(np.float32)
    return rows


def _frame_inputs(run: LoadedRun, pose: dict):
    from fmgs.trainer.models.full import pose_frame

    m = run.model
    pc = m.pose_correction
    rot, B = pose_frame(pose["poses"], pose["frame_id"] if pc is not None else None, pc, run.setup.rest_joints,
                        run.setup.canonical_G, pose["world_from_body"])
    return rot, B


@torch.no_grad()
def parity_check(run: LoadedRun, baked: Baked, model_dir: Path, entries: dict, parity_frame, frames: int = 3,
                 threads: int = 2, suffix: str = ".onnx", tol: float = PARITY_TOL) -> dict:
    """ONNX Runtime vs torch on ``frames`` real training poses (module docstring).

    Args:
        run, baked: the loaded run and its bake.
        model_dir: folder holding the ONNX files named by ``entries``.
        entries: manifest ``models`` entries (the model kind's ``export_models``).
        parity_frame: the model kind's per-pose comparison (:mod:`fmgs.export.adapters`).
        frames: number of evenly spaced training frames.
        threads: ORT intra-op threads.
        suffix: ``".onnx"`` (fp32) or ``".fp16.onnx"``.
        tol: pass threshold on the per-model max abs error.

    Returns:
        dict: ``frames`` (names), ``models`` ({model: {output: max abs err}}), ``max_abs_error``,
        ``end_to_end`` ({``colors``: max abs, ``means_mm``: max mm}), ``tolerance``, ``passed``.
    """
    sess = {k: make_session(model_dir / (Path(e["file"]).stem + suffix), threads) for k, e in entries.items()}
    poses = training_poses(run, frames)
    errs: dict[str, dict[str, float]] = {k: {} for k in entries}
    e2e = {"colors": 0.0, "means_mm": 0.0}

    def upd(model, out, val):
        errs[model][out] = max(errs[model].get(out, 0.0), val)

    for pose in poses:
        parity_frame(run, baked, sess, entries, pose, upd, e2e)
    worst = max((v for d in errs.values() for v in d.values()), default=0.0)
    return {"frames": [p["name"] for p in poses], "precision": "fp16" if "fp16" in suffix else "fp32",
            "models": errs, "max_abs_error": worst, "end_to_end": e2e, "tolerance": tol,
            "passed": bool(worst < tol)}


def _weight_stats(dW: torch.Tensor, B: torch.Tensor, mu: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-surfel ``max_b |dW|`` and posed-centre displacement ``|sum_b dW_b B_b mu|`` (metres), float64."""
    dW = dW.double()
    dT = torch.einsum("sb,bij->sij", dW, B.double())
    disp = (torch.einsum("sij,sj->si", dT[:, :3, :3], mu.double()) + dT[:, :3, 3]).norm(dim=1)
    return dW.abs().amax(1).numpy(), disp.numpy()


def _summary(wd: list, disp: list) -> dict:
    wd, disp = np.concatenate(wd), np.concatenate(disp) * 1e3
    return {"max_weight_diff": float(wd.max()), "p99_weight_diff": float(np.percentile(wd, 99)),
            "max_displacement_mm": float(disp.max()), "p99_displacement_mm": float(np.percentile(disp, 99)),
            "mean_displacement_mm": float(disp.mean())}


@torch.no_grad()
def skinning_bake_check(run: LoadedRun, baked: Baked, frames: int = 32) -> dict:
    """Error of the baked skinning weights, and ``W(mu)`` against ``W(mu')`` (eq. 9).

    The bundle stores ``W(mu)``: eq. 9 at the canonical centres. Over ``frames`` training
    poses (each with its learnt pose correction) this measures, per surfel and pose,

    * ``bake_error``: the baked weights against the weights the trained model's own forward
      uses for that pose (:meth:`FMGSAvatar.skinning_weights`: ``W(mu)`` for
      ``skinning_query=canonical`` -- the bake is then exact, and the numbers are 0 --,
      ``W(mu')`` for ``corrected``);
    * ``canonical_vs_corrected``: ``W(mu)`` against eq. 9 at the pose's corrected centre
      ``W(mu')`` (the paper's query), whatever the model was trained with.

    Each as ``max_b |dW|`` (max and 99th percentile over surfels and poses) and the posed-centre
    displacement ``|sum_b dW_b B_b mu'|`` in mm (max, p99, mean).

    Args:
        run, baked: the loaded run and its bake.
        frames: evenly spaced training frames (``<= 0``: all).

    Returns:
        dict: ``applicable``, ``frames``, ``skinning_query_trained``, ``exact`` (bake error
        exactly 0), ``bake_error`` {..}, ``canonical_vs_corrected`` {..},
        ``max_residual_offset_mm`` (``max |mu' - mu|``), ``note``. Models without a skinning
        field (SMPL weights, foundation model): ``applicable: False``, exact.
    """
    m = run.model
    if m.skinning_field is None:
        return {"applicable": False, "frames": 0, "exact": True,
                "note": "skinning weights are SMPL's (no skinning field): the bake is exact"}
    from fmgs.trainer.models.fields import apply_geometry_residual

    W0 = torch.as_tensor(baked.surfels["skin_weights"])                      # what the bundle stores
    prior = m.skin_weights if m.cfg.skinning_prior else None
    J_hat = baked.torch_inputs["J_hat"]
    q = str(m.cfg.skinning_query)
    bake_wd, bake_disp, cc_wd, cc_disp, offs = [], [], [], [], []
    W_canon = None
    poses = training_poses(run, frames)
    for pose in poses:
        rot, B = _frame_inputs(run, pose)
        z_p = m.pose_encoder(rot, J_hat)
        mu_b, R_b, s_b = m.base_surfels()
        if m.geometry_field is not None:                                     # eq. 3-4 (the trainer's own)
            res = m.geometry_residual(baked.torch_inputs["f_g"], z_p)
            mu_c = apply_geometry_residual(mu_b, R_b, s_b, None, res).centers
        else:
            mu_c = mu_b
        if q != "canonical" or W_canon is None:                             # canonical: pose-independent
            W_used = m.skinning_weights(mu_c, training=False)               # the trained forward's weights
            W_canon = W_used if q == "canonical" else None
        W_corr = m.skinning_field(mu_c, prior_weights=prior)                # eq. 9 at mu'
        a, b = _weight_stats(W_used - W0, B, mu_c)
        bake_wd.append(a)
        bake_disp.append(b)
        a, b = _weight_stats(W_corr - W0, B, mu_c)
        cc_wd.append(a)
        cc_disp.append(b)
        offs.append((mu_c - m.centers).norm(dim=1).numpy())
    bake = _summary(bake_wd, bake_disp)
    note = ("trained with skinning_query=canonical: the forward uses W(mu), so the baked weights are exactly the "
            "trained ones (bake_error 0); canonical_vs_corrected is how far the paper's W(mu') would be"
            if q == "canonical" else
            "trained with skinning_query=corrected (W(mu') per pose): bake_error is the error the baked W(mu) "
            "introduces (= canonical_vs_corrected)")
    return {"applicable": True, "frames": len(poses), "skinning_query_trained": q,
            "exact": bool(bake["max_weight_diff"] == 0.0), "bake_error": bake,
            "canonical_vs_corrected": _summary(cc_wd, cc_disp),
            "max_residual_offset_mm": float(np.concatenate(offs).max() * 1e3), "note": note}


@torch.no_grad()
def full_parity_frame(run: LoadedRun, baked: Baked, sess: dict, entries: dict, pose: dict, upd, e2e: dict) -> None:
    """One pose of :func:`parity_check`: ORT vs torch per model (``upd(model, output, err)``)
    and end to end (``e2e['colors']``, ``e2e['means_mm']`` maxima, updated in place)."""
    m = run.model
    W = baked.surfels["skin_weights"]
    cam = pose["camera_center"]
    from fmgs.trainer.models.full import canonical_pose_joints

    rot, B = _frame_inputs(run, pose)
    posed = m(rot, B, torch.as_tensor(cam, dtype=torch.float32),
              torch.as_tensor(canonical_pose_joints(run.setup.surfels), dtype=torch.float32), training=False)
    z_p = posed.pose_code
    rot_np = _np(rot)
    (zo,) = sess["pose_encoder"].run(None, {"rot_mats": rot_np})
    upd("pose_encoder", "pose_code", _err(zo, _np(z_p)))
    s = baked.surfels
    z_g_t = posed.residual.z_g if posed.residual is not None else torch.zeros(m.num_surfels,
                                                                              m.cfg.geometry_latent_dim)
    g_in = {"geometry_features": s["geometry_features"], "pose_code": _np(z_p), "centers": s["centers"],
            "rotations": s["rotations"], "scales": s["scales"]}
    g = run_rows(sess["geometry"], entries["geometry"], g_in)
    for name, b in (("centers_out", posed.canonical_centers), ("rotations_out", posed.canonical_rotations),
                    ("scales_out", posed.scales), ("z_g", z_g_t)):
        upd("geometry", name, _err(g[name], _np(b)))
    view = any(i["name"].startswith("view_dirs") for i in entries["color"]["inputs"])
    c_in = {"appearance_features": s["appearance_features"], "z_g": _np(z_g_t), "pose_code": _np(z_p)}
    if view:
        d = F.normalize(posed.means - torch.as_tensor(cam, dtype=torch.float32)[None], dim=-1)
        from fmgs.trainer.models.fields import canonicalize_view_dirs

        c_in["view_dirs"] = _np(canonicalize_view_dirs(d, posed.transforms))
    col = run_rows(sess["color"], entries["color"], c_in)["colors"]
    upd("color", "colors", _err(col, _np(posed.colors)))
    if "skinning" in sess:
        sk_in = {"points": _np(posed.canonical_centers)}
        if m.cfg.skinning_prior:
            sk_in["prior_weights"] = _np(m.skin_weights)
        (w_o,) = sess["skinning"].run(None, sk_in)
        ref = m.skinning_field(posed.canonical_centers,
                               prior_weights=m.skin_weights if m.cfg.skinning_prior else None)
        upd("skinning", "skin_weights", _err(w_o, _np(ref)))
    # end to end: ORT chain + NumPy LBS with the baked weights (what the runtime does)
    (zc,) = sess["pose_encoder"].run(None, {"rot_mats": rot_np})
    g2 = run_rows(sess["geometry"], entries["geometry"], {**g_in, "pose_code": zc})
    means, _, T = numpy_lbs(W, _np(B), g2["centers_out"], g2["rotations_out"])
    c2 = {"appearance_features": s["appearance_features"], "z_g": g2["z_g"], "pose_code": zc}
    if view:
        c2["view_dirs"] = canonical_view_dirs(means, T, cam, "inverse").astype(np.float32)
    col2 = run_rows(sess["color"], entries["color"], c2)["colors"]
    e2e["colors"] = max(e2e["colors"], _err(col2, _np(posed.colors)))
    e2e["means_mm"] = max(e2e["means_mm"], 1e3 * _err(means, _np(posed.means)))


@torch.no_grad()
def foundation_parity_frame(run: LoadedRun, baked: Baked, sess: dict, entries: dict, pose: dict, upd, e2e: dict) -> None:
    """One pose of :func:`parity_check`: ORT vs torch per model (``upd(model, output, err)``)
    and end to end (``e2e['colors']``, ``e2e['means_mm']`` maxima, updated in place)."""
    m = run.model
    W = baked.surfels["skin_weights"]
    cam = pose["camera_center"]
    from fmgs.trainer.models.fields import blend_lbs
    from fmgs.trainer.models.base import frame_bone_transforms

    B = frame_bone_transforms(run.setup.smpl, run.setup.rest_joints, run.setup.canonical_G,
                              pose["poses"], pose["world_from_body"])
    Bt = torch.as_tensor(B, dtype=torch.float32)
    posed = m(Bt, torch.as_tensor(cam, dtype=torch.float32))
    s = baked.surfels
    c_in = {"appearance_features": s["appearance_features"]}
    view = m.view_dependent
    mu_t = baked.torch_inputs["mu"]
    if view:
        lbs = blend_lbs(m.skin_weights, Bt, mu_t, m.frames)
        d = F.normalize(lbs.means - torch.as_tensor(cam, dtype=torch.float32)[None], dim=-1)
        M = lbs.transforms[:, :3, :3]
        c_in["view_dirs"] = _np(F.normalize(torch.einsum("sji,sj->si", M, d), dim=-1))
    col = run_rows(sess["color"], entries["color"], c_in)["colors"]
    upd("color", "colors", _err(col, _np(posed.colors)))
    means, _, T = numpy_lbs(W, B.astype(np.float32), s["centers"], s["rotations"])
    c2 = {"appearance_features": s["appearance_features"]}
    if view:
        c2["view_dirs"] = canonical_view_dirs(means, T, cam, "transpose").astype(np.float32)
    col2 = run_rows(sess["color"], entries["color"], c2)["colors"]
    e2e["colors"] = max(e2e["colors"], _err(col2, _np(posed.colors)))
    e2e["means_mm"] = max(e2e["means_mm"], 1e3 * _err(means, _np(posed.means)))
