"""SMPL fit to BlazePose landmarks and person masks (SMPLify family, torch on CPU).

Unknowns: one ``betas`` (10,) for the whole video; per frame the body pose (23 joints,
axis-angle), the global orientation ``Rh`` (3,) and translation ``Th`` (3,) in the
HumanNeRF/ZJU convention ``x_cam = rodrigues(Rh) @ x_body + Th`` (``x_body``: SMPL with a
zero root rotation and no translation; world frame = camera frame).

Objective (weights in :class:`FitConfig`), after SMPLify (Bogo et al. 2016) and SMPLify-X
(Pavlakos et al. 2019):

* 2D reprojection: Geman-McClure robust error (``rho(r) = s^2 r^2 / (s^2 + r^2)``, ``r`` in
  units of the image side), weighted by the landmark visibility and a per-landmark weight;
* 3D hint: BlazePose's metric world landmarks (hip-centred), rotated per frame onto the
  model's camera-frame points relative to their hip midpoint (Kabsch, no gradient), against
  them (robust error). Only the body's shape of pose is taken from them, not its orientation:
  on ZJU-MoCap 377 their joints are 88 mm off the dataset's as given, 59 mm after a
  similarity alignment;
* silhouette: projected vertices must lie inside the mask (squared distance to the mask,
  sampled from its distance transform) and mask contour points must have a projected vertex
  near them (one-sided chamfer);
* pose prior (no learned prior's weights can be fetched): SMPLify's bend-direction limits of
  elbows and knees, no knee twist/side bend, small wrists/ankles/feet/hands, an L2 pull to
  the rest pose; shape prior ``|betas|^2``;
* temporal smoothness: joint accelerations and pose velocities (video input only).

Initialisation: rest pose with the arms lowered (A-pose); the global orientation from a
Kabsch alignment of the SMPL torso joints to the world landmarks (so a person turning away
starts facing away), defaulting to facing the camera; the depth from the torso's image
height. Coarse to fine: global placement on the torso landmarks, then pose and shape on all
landmarks, then everything with the silhouette; all frames in one batch.

Landmark -> SMPL mapping (:data:`LANDMARK_MAP`): BlazePose shoulders/elbows/wrists/hips/knees/
ankles -> SMPL joints 16-21, 1, 2, 4, 5, 7, 8; nose, eyes, ears, heels and big toes -> SMPL
vertices 332, 2800/6260, 583/4071, 3387/6787, 3216/6617 (the SMPL vertex ids that SMPLify-X /
``smplx.vertex_ids`` use for the OpenPose face and foot keypoints). With
``FitConfig.hand_landmarks`` (default on) the midpoint of each hand's index and pinky knuckles
(BlazePose 17/19 and 18/20, :data:`VIRTUAL_LANDMARKS`) -> SMPL hand joints 22/23 (weight 0.5):
it fixes the wrist rotation. On ZJU-MoCap 377's training frames (0-454) against the dataset's
fits: PA-MPJPE 68.8 -> 65.7 mm, 2D hand-joint error (per-joint bias removed) 8.2 -> 7.7 px,
body joints unchanged (docs/benchmarks.md).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from fmgs.body_model import SMPLModel, matrix_to_axis_angle
from fmgs.trainer.models.fields import so3_exp
from fmgs.trainer.models.smpl_torch import forward_kinematics_torch

__all__ = ["LANDMARK_MAP", "FitConfig", "FitResult", "fit_smpl", "a_pose"]

# (BlazePose landmark, 'j' joint | 'v' vertex, SMPL index, weight)
LANDMARK_MAP = [
    (0, "v", 332, 1.0), (2, "v", 2800, 0.5), (5, "v", 6260, 0.5), (7, "v", 583, 0.5),
    (8, "v", 4071, 0.5),
    (11, "j", 16, 1.0), (12, "j", 17, 1.0), (13, "j", 18, 1.0), (14, "j", 19, 1.0),
    (15, "j", 20, 1.0), (16, "j", 21, 1.0),
    # BlazePose's hip landmarks sit higher and wider than SMPL's hip joints (as OpenPose's):
    # lower weight, as SMPLify does for the hips.
    (23, "j", 1, 0.5), (24, "j", 2, 0.5),
    (25, "j", 4, 1.0), (26, "j", 5, 1.0), (27, "j", 7, 1.0), (28, "j", 8, 1.0),
    (29, "v", 3387, 0.7), (30, "v", 6787, 0.7), (31, "v", 3216, 0.7), (32, "v", 6617, 0.7),
]
TORSO = [11, 12, 23, 24]  # BlazePose shoulders and hips

#: Virtual landmarks appended after BlazePose's 33: the midpoint of the index and pinky
#: knuckles (MCP) of each hand, where SMPL's hand joints (22 left, 23 right) sit; they give
#: the wrist rotation that the wrist landmark alone leaves free. (index, landmark a, b)
VIRTUAL_LANDMARKS = [(33, 17, 19), (34, 18, 20)]
HAND_MAP = [(33, "j", 22, 0.5), (34, "j", 23, 0.5)]


def with_virtual_landmarks(keypoints: np.ndarray, world: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Append :data:`VIRTUAL_LANDMARKS` to ``(F, 33, 3)`` keypoints (``u, v``, visibility:
    the smaller of the two) and world landmarks (midpoints)."""
    kps, wls = [keypoints], [world]
    for _, a, b in VIRTUAL_LANDMARKS:
        k = 0.5 * (keypoints[:, a] + keypoints[:, b])
        k[:, 2] = np.minimum(keypoints[:, a, 2], keypoints[:, b, 2])
        kps.append(k[:, None])
        wls.append(0.5 * (world[:, a] + world[:, b])[:, None])
    return np.concatenate(kps, 1), np.concatenate(wls, 1)


def a_pose() -> np.ndarray:
    """(24, 3) float64 rest pose with both upper arms lowered by 0.9 rad (about SMPL's z)."""
    p = np.zeros((24, 3))
    p[16, 2], p[17, 2] = -0.9, 0.9
    return p


@dataclass
class FitConfig:
    """Weights and schedule of :func:`fit_smpl` (defaults set on ZJU-MoCap 377 and
    PeopleSnapshot, see docs/benchmarks.md)."""

    iters: tuple[int, int, int] = (80, 250, 60)
    lr: float = 0.03
    sigma: float = 0.05          # robust scale, fraction of the image side
    w_2d: float = 1.0
    w_3d: float = 1.0
    sigma_3d: float = 0.2        # robust scale of the 3D hint, metres
    w_sil_in: float = 0.3
    w_sil_cover: float = 0.3
    w_pose: float = 2e-4
    w_limits: float = 0.05
    w_betas: float = 1e-4
    w_acc: float = 0.2
    w_vel: float = 1e-3
    sil_vertices: int = 400
    contour_points: int = 96
    hand_landmarks: bool = True
    seed: int = 0


@dataclass
class FitResult:
    """Fitted SMPL parameters (float64 NumPy) and per-frame diagnostics.

    Attributes:
        betas: (10,); poses: (F, 72) axis-angle with the root zeroed (ZJU convention);
        Rh: (F, 3) axis-angle; Th: (F, 3) metres, camera frame; reproj_px: (F,) mean
        visibility-weighted 2D error of the mapped landmarks in pixels; seconds: wall time
        per stage.
    """

    betas: np.ndarray
    poses: np.ndarray
    Rh: np.ndarray
    Th: np.ndarray
    reproj_px: np.ndarray
    seconds: dict = field(default_factory=dict)


def _gmof(r2: torch.Tensor, s: float) -> torch.Tensor:
    return s * s * r2 / (s * s + r2)


def _kabsch(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Rotation R minimising |R src_c - dst_c| (both (N,3), centred inside)."""
    a, b = src - src.mean(0), dst - dst.mean(0)
    U, _, Vt = np.linalg.svd(b.T @ a)
    d = np.sign(np.linalg.det(U @ Vt))
    return U @ np.diag([1, 1, d]) @ Vt


def _contour_points(mask: np.ndarray, n: int, rng) -> np.ndarray:
    """(n, 2) float32 pixel points on the outer contours of ``mask`` (random, repeated if
    short; zeros when the mask is empty)."""
    import cv2

    cs, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not cs:
        return np.zeros((n, 2), np.float32)
    pts = np.concatenate([c.reshape(-1, 2) for c in cs]).astype(np.float32)
    return pts[rng.choice(len(pts), n, replace=len(pts) < n)]


def fit_smpl(model: SMPLModel, K: np.ndarray, image_size: int, keypoints: np.ndarray,
             world: np.ndarray, masks: np.ndarray | None, video: bool = True,
             cfg: FitConfig | None = None, progress: bool = True) -> FitResult:
    """Fit SMPL to F frames (see the module docstring for the objective).

    Args:
        model: neutral SMPL (:func:`fmgs.body_model.load_smpl`).
        K: (3, 3) intrinsics of the (square) prepared images, pixels, OpenCV convention.
        image_size: side of the prepared images, pixels.
        keypoints: (F, 33, 3) BlazePose ``u, v`` (pixels of the prepared images) and
            visibility.
        world: (F, 33, 3) BlazePose world landmarks (m).
        masks: (F, h, w) uint8 {0,1} person masks (any h = w, e.g. downsampled) or None.
        video: frames are consecutive (enables the temporal terms).
        cfg: weights and schedule.
        progress: show a tqdm bar.

    Returns:
        :class:`FitResult`.
    """
    import torch.nn.functional as Fn
    from tqdm import tqdm

    cfg = cfg or FitConfig()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    F = keypoints.shape[0]
    S = float(image_size)
    dt = torch.float32
    Kt = torch.as_tensor(K, dtype=dt)
    parents = [int(p) for p in model.parents]
    vt = torch.as_tensor(model.v_template, dtype=dt)
    sd = torch.as_tensor(model.shapedirs[..., :10], dtype=dt)
    Jreg = torch.as_tensor(model.J_regressor, dtype=dt)
    Wt = torch.as_tensor(model.weights, dtype=dt)

    lmap = LANDMARK_MAP + (HAND_MAP if cfg.hand_landmarks else [])
    if cfg.hand_landmarks:
        keypoints, world = with_virtual_landmarks(keypoints, world)
    lm_idx = [m[0] for m in lmap]
    kinds = [m[1] for m in lmap]
    ids = [m[2] for m in lmap]
    lw = torch.tensor([m[3] for m in lmap], dtype=dt)
    vid = [i for k, i in zip(kinds, ids) if k == "v"]
    sil_v = np.sort(rng.choice(model.v_template.shape[0], cfg.sil_vertices, replace=False))
    all_v = torch.as_tensor(np.concatenate([vid, sil_v]), dtype=torch.long)
    kp = torch.as_tensor(keypoints[:, lm_idx, :2], dtype=dt) / S           # (F,L,2)
    vis = torch.as_tensor(keypoints[:, lm_idx, 2], dtype=dt).clamp(0, 1)   # (F,L)
    wl = torch.as_tensor(world[:, lm_idx], dtype=dt)                       # (F,L,3)
    wl = wl - 0.5 * (torch.as_tensor(world[:, 23], dtype=dt) + torch.as_tensor(world[:, 24], dtype=dt))[:, None]
    torso_sel = torch.tensor([l in TORSO for l in lm_idx])
    hipL, hipR = lm_idx.index(23), lm_idx.index(24)

    # --- silhouette inputs: distance-to-mask maps and contour samples
    if masks is not None:
        import cv2

        h = masks.shape[1]
        dts = np.stack([cv2.distanceTransform((1 - m).astype(np.uint8), cv2.DIST_L2, 3)
                        for m in masks]).astype(np.float32) / h                # side units
        dmap = torch.as_tensor(dts)[:, None]                                   # (F,1,h,h)
        contour = torch.as_tensor(np.stack([
            (_contour_points(m, cfg.contour_points, rng) + 0.5) / h for m in masks]))  # (F,P,2)
        has_mask = torch.as_tensor(masks.reshape(F, -1).any(1), dtype=dt)
    # --- initialisation
    j_rest0 = (Jreg @ vt).numpy().astype(np.float64)
    torso_rest = j_rest0[[16, 17, 1, 2]]
    Rh0 = np.zeros((F, 3))
    Th0 = np.zeros((F, 3))
    face_cam = np.diag([1.0, -1.0, -1.0])
    fx = float(K[0, 0])
    for f in range(F):
        tv = keypoints[f, TORSO, 2]
        R = face_cam
        if tv.min() > 0.3:
            R = _kabsch(torso_rest, world[f, TORSO].astype(np.float64))
        Rh0[f] = matrix_to_axis_angle(R)
        sh = keypoints[f, [11, 12], :2].mean(0)
        hp = keypoints[f, [23, 24], :2].mean(0)
        h2d = max(np.linalg.norm(sh - hp), 0.05 * S)
        z = fx * 0.5 / h2d  # SMPL's shoulder-to-hip midpoint distance is about 0.5 m
        uv = hp if tv.min() > 0.1 else np.array([K[0, 2], K[1, 2]])
        ray = np.linalg.solve(K, np.array([uv[0], uv[1], 1.0])) * z
        Th0[f] = ray - R @ j_rest0[[1, 2]].mean(0)
    body0 = np.tile(a_pose()[1:].reshape(1, 69), (F, 1))

    Rh = torch.tensor(Rh0, dtype=dt, requires_grad=True)
    Th = torch.tensor(Th0, dtype=dt, requires_grad=True)
    body = torch.tensor(body0, dtype=dt, requires_grad=True)
    betas = torch.zeros(10, dtype=dt, requires_grad=True)

    lim_sign = {(18, 1): 1.0, (19, 1): -1.0, (4, 0): -1.0, (5, 0): -1.0}  # SMPLify's angle prior
    small = [(4, 1), (4, 2), (5, 1), (5, 2)]
    quiet = [7, 8, 10, 11, 20, 21, 22, 23]

    def forward(with_sil: bool = True):
        v_sh = vt + sd @ betas
        j_rest = Jreg @ v_sh
        pose = torch.cat([torch.zeros(F, 3, dtype=dt), body], 1).view(F, 24, 3)
        G = forward_kinematics_torch(so3_exp(pose), j_rest, parents)
        joints = G[..., :3, 3] + (G[..., :3, :3] @ j_rest[..., None])[..., 0]
        sel = all_v if with_sil else all_v[:len(vid)]  # skinning the silhouette vertices is most of the cost
        Gv = torch.einsum("vb,fbij->fvij", Wt[sel], G)
        verts = (Gv[..., :3, :3] @ v_sh[sel][..., None])[..., 0] + Gv[..., :3, 3]
        R = so3_exp(Rh)
        to_cam = lambda x: x @ R.transpose(1, 2) + Th[:, None]
        jc, vc = to_cam(joints), to_cam(verts)
        nv = len(vid)
        pts = []
        vi = 0
        for k, i in zip(kinds, ids):
            if k == "j":
                pts.append(jc[:, i])
            else:
                pts.append(vc[:, vi])
                vi += 1
        pts = torch.stack(pts, 1)
        return pts, jc, vc[:, nv:], pose

    def project(x):
        z = x[..., 2:3].clamp(min=0.1)
        uv = (x / z) @ Kt.T
        return uv[..., :2] / S

    def losses(stage):
        pts, jc, sv, pose = forward(with_sil=stage >= 2 and masks is not None)
        L = {}
        r2 = ((project(pts) - kp) ** 2).sum(-1)
        w = vis * lw
        if stage == 0:
            w = w * torso_sel
        L["2d"] = cfg.w_2d * (w * _gmof(r2, cfg.sigma)).sum() / w.sum().clamp(min=1e-6) / cfg.sigma**2
        rel = pts - 0.5 * (pts[:, hipL] + pts[:, hipR])[:, None]
        with torch.no_grad():  # per-frame rotation of the world landmarks onto the model
            H = (wl * w[..., None]).transpose(1, 2) @ rel
            U, _, Vh = torch.linalg.svd(H)
            d = torch.sign(torch.det(Vh.transpose(1, 2) @ U.transpose(1, 2)))
            D = torch.diag_embed(torch.stack([torch.ones_like(d), torch.ones_like(d), d], -1))
            Rw = Vh.transpose(1, 2) @ D @ U.transpose(1, 2)
        e3 = ((rel - wl @ Rw.transpose(1, 2)) ** 2).sum(-1)
        L["3d"] = cfg.w_3d * (w * _gmof(e3, cfg.sigma_3d)).sum() / w.sum().clamp(min=1e-6) / cfg.sigma_3d**2
        if stage >= 1:
            lim = sum(torch.relu(s * pose[:, j, a]) ** 2 for (j, a), s in lim_sign.items())
            lim = lim + sum(pose[:, j, a] ** 2 for j, a in small)
            lim = lim + (pose[:, quiet] ** 2).sum((1, 2)) * 0.3
            L["limits"] = cfg.w_limits * lim.mean() * 100
            L["pose"] = cfg.w_pose * (body ** 2).sum(1).mean() * 100
            L["betas"] = cfg.w_betas * (betas ** 2).sum() * 100
            if video and F >= 3:
                acc = jc[2:] - 2 * jc[1:-1] + jc[:-2]
                L["acc"] = cfg.w_acc * (acc ** 2).sum(-1).mean() * 100
                L["vel"] = cfg.w_vel * ((body[1:] - body[:-1]) ** 2).sum(1).mean() * 100
        if stage >= 2 and masks is not None:
            uv = project(sv)                                                     # (F,V,2)
            g = (uv * 2 - 1)[:, :, None]                                         # (F,V,1,2)
            d = Fn.grid_sample(dmap, g, align_corners=False, padding_mode="border")[:, 0, :, 0]
            L["sil_in"] = cfg.w_sil_in * ((d ** 2).mean(1) * has_mask).mean() * 100
            cd = torch.cdist(contour, uv).min(-1).values                         # (F,P)
            L["sil_cover"] = cfg.w_sil_cover * ((cd ** 2).mean(1) * has_mask).mean() * 100
        return L

    seconds = {}
    stages = [([Rh, Th], 0), ([Rh, Th, body, betas], 1), ([Rh, Th, body, betas], 2)]
    total = sum(cfg.iters)
    bar = tqdm(total=total, desc="SMPL fit", unit="it", disable=not progress)
    for (params, stage), n in zip(stages, cfg.iters):
        t0 = time.perf_counter()
        opt = torch.optim.Adam(params, lr=cfg.lr if stage == 0 else cfg.lr * 0.5)
        for it in range(n):
            opt.zero_grad()
            L = losses(stage)
            loss = sum(L.values())
            loss.backward()
            opt.step()
            bar.update(1)
            if it % 20 == 0:
                bar.set_postfix({k: f"{v.item():.3g}" for k, v in L.items()})
        seconds[f"stage{stage}"] = time.perf_counter() - t0
    bar.close()
    with torch.no_grad():
        pts, *_ = forward(with_sil=False)
        err = ((project(pts) - kp) * S).norm(dim=-1)
        reproj = ((err * vis).sum(1) / vis.sum(1).clamp(min=1e-6)).numpy()
    poses = np.zeros((F, 72))
    poses[:, 3:] = body.detach().numpy()
    return FitResult(betas.detach().numpy().astype(np.float64), poses,
                     Rh.detach().numpy().astype(np.float64), Th.detach().numpy().astype(np.float64),
                     reproj.astype(np.float64), seconds)
