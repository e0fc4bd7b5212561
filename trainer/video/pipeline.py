"""``fmgs-prep video``: a raw monocular video (or image folder) -> HumanNeRF-format sequence.

Stages (each resumable: a killed prep continues where it stopped):

1. ``detect``: decode, undistort (when the calibration has distortion), square-crop and
   resize each frame (:mod:`.frames`), write ``images/frame_%06d.png`` (the number is the
   raw frame index) and run BlazePose (:mod:`.mediapipe_pose`): 33 landmarks, world
   landmarks, soft mask, kept per frame in ``.prep/detect/``.
2. ``masks``: temporal smoothing of the soft masks (mean of t-1, t, t+1 for videos),
   threshold 0.5, then the connected component holding most of the person's landmarks
   (drops other people and clutter); or the user's ``--masks DIR``.
3. ``fit``: the SMPL fit (:mod:`.fit`), saved to ``.prep/fit.npz``.
4. ``write``: ``masks/``, ``cameras.pkl`` (static camera, world = camera: extrinsics =
   identity, no distortion since the images are undistorted), ``mesh_infos.pkl`` (ZJU
   convention: ``poses`` with the root zeroed, ``Rh``/``Th``, ``joints``, ``tpose_joints``,
   ``betas``), ``canonical_joints.pkl``, ``overlay.mp4`` and ``contact_sheet.png`` (fitted
   SMPL over the frames), and last ``fit_report.json``.

``cameras.pkl``/``mesh_infos.pkl`` and ``fit_report.json`` are written (atomically) only
when everything else is, so a folder without ``fit_report.json`` is never mistaken for a
finished one; the HumanNeRF reader refuses a folder without ``cameras.pkl``.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from fmgs.atomic import atomic_path, write_json_atomic
from fmgs.errors import FmgsInputError
from fmgs.trainer.engine.metrics import silhouette_errors

from .frames import (Calibration, FrameSource, crop_resize_K, default_calibration,
                     load_calibration)

__all__ = ["PrepOptions", "prepare_video", "rasterize_silhouette", "MIN_FRAMES"]

MIN_FRAMES = 3          # fewer usable frames cannot constrain one body shape
MIN_FOUND_FRACTION = 0.5
FIT_MASK_SIZE = 128     # masks are downsampled to this side for the silhouette term


@dataclass
class PrepOptions:
    """Settings of :func:`prepare_video` (the CLI flags of ``fmgs-prep video``)."""

    input: str
    out: str
    start: int = 0
    stop: int | None = None
    step: int = 1
    size: int | None = 512
    camera: str | None = None
    fov: float | None = None
    focal: float | None = None
    masks: str | None = None
    smpl_path: str | None = None
    fit_iters: tuple[int, int, int] | None = None
    unordered: bool = False
    overwrite: bool = False
    progress: bool = True

    def key(self) -> dict:
        """The settings that decide the outputs (compared when resuming)."""
        d = asdict(self)
        for k in ("out", "overwrite", "progress"):
            d.pop(k)
        d["input"] = os.path.abspath(self.input)
        d["fit_iters"] = list(self.fit_iters) if self.fit_iters else None
        return d


def _write_png(path: Path, img: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        ok, buf = cv2.imencode(".png", img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        if not ok:
            raise FmgsInputError("cannot encode PNG", path)
        tmp.write_bytes(buf.tobytes())


def _write_pickle(path: Path, obj) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            pickle.dump(obj, f, protocol=4)


def rasterize_silhouette(verts_cam: np.ndarray, faces: np.ndarray, K: np.ndarray,
                         size: int) -> np.ndarray:
    """Binary silhouette of a mesh in a pinhole camera (OpenCV convention), by filling every
    projected triangle one by one (no z-test needed for a silhouette; one ``cv2.fillPoly``
    call over all triangles would fill overlaps by the even-odd rule and leave holes). Pixels
    whose centre is inside a triangle are set, and so are those its edges touch (cv2's
    line rule), i.e. at most one pixel more around the outline.

    Args:
        verts_cam: (V, 3) camera-frame vertices (m), z > 0; faces: (T, 3) int;
        K: (3, 3) intrinsics; size: square image side.

    Returns:
        (size, size) uint8 in {0, 1}.
    """
    z = np.clip(verts_cam[:, 2:3], 1e-3, None)
    uv = (verts_cam / z) @ K.T
    shift = 4
    pts = np.round(uv[:, :2] * (1 << shift)).astype(np.int32)[faces]
    m = np.zeros((size, size), np.uint8)
    for tri in pts:
        cv2.fillConvexPoly(m, tri, 1, lineType=cv2.LINE_8, shift=shift)
    return m


#: A removed mask region at least this fraction of the kept person's area counts as
#: "another person or a large object" in the fit report.
OTHER_REGION_FRACTION = 0.2


def other_regions(mask: np.ndarray, kept: np.ndarray) -> int:
    """Number of connected regions of ``mask`` outside ``kept`` whose area is at least
    :data:`OTHER_REGION_FRACTION` of ``kept``'s (both (H, W) {0,1})."""
    rest = (mask.astype(bool) & ~kept.astype(bool)).astype(np.uint8)
    n, _, stats, _ = cv2.connectedComponentsWithStats(rest, connectivity=8)
    area = max(1, int(kept.sum()))
    return int((stats[1:, cv2.CC_STAT_AREA] >= OTHER_REGION_FRACTION * area).sum())


def _largest_person_component(mask: np.ndarray, kp: np.ndarray) -> np.ndarray:
    """The connected component of ``mask`` (H, W) that holds most of the confident
    landmarks ``kp`` (33, 3) of the tracked person (the largest one when none does)."""
    n, lab = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    if n <= 2:
        return mask
    H, W = mask.shape
    votes = np.zeros(n)
    for u, v, c in kp:
        iu, iv = int(round(u)), int(round(v))
        if c > 0.5 and 0 <= iu < W and 0 <= iv < H:
            votes[lab[iv, iu]] += 1
    votes[0] = -1
    if votes.max() <= 0:
        votes = np.bincount(lab.ravel(), minlength=n).astype(float)
        votes[0] = -1
    return (lab == int(np.argmax(votes))).astype(np.uint8)


class _Prep:
    def __init__(self, opt: PrepOptions):
        self.opt = opt
        self.out = Path(opt.out)
        self.state = self.out / ".prep"
        self.timings: dict = {}
        self.notes: list[str] = []
        self.other_regions: dict[str, int] = {}

    # ------------------------------------------------------------------ folder state
    def open_out(self) -> None:
        out, opt = self.out, self.opt
        cfg_path = self.state / "config.json"
        if out.exists() and not out.is_dir():
            raise FmgsInputError("output exists and is not a folder", out)
        if out.is_dir() and any(out.iterdir()):
            if (out / "fit_report.json").is_file() and not opt.overwrite:
                raise FmgsInputError("already holds a prepared sequence; pass --overwrite "
                                     "to prepare it again", out)
            if not cfg_path.is_file():
                raise FmgsInputError("output folder is not empty and is no fmgs-prep video "
                                     "folder; choose another --out", out)
            old = json.loads(cfg_path.read_text())
            if old != opt.key():
                if not opt.overwrite:
                    raise FmgsInputError("holds an unfinished prep with other settings; use "
                                         "the same settings to resume, or --overwrite", out)
            if opt.overwrite or old != opt.key():
                for sub in ("images", "masks", ".prep"):
                    shutil.rmtree(out / sub, ignore_errors=True)
                for f in ("cameras.pkl", "mesh_infos.pkl", "canonical_joints.pkl",
                          "fit_report.json", "overlay.mp4", "contact_sheet.png"):
                    (out / f).unlink(missing_ok=True)
        (self.state / "detect").mkdir(parents=True, exist_ok=True)
        write_json_atomic(cfg_path, opt.key())

    # ------------------------------------------------------------------ stage 1
    def calibration(self, src: FrameSource) -> Calibration:
        opt = self.opt
        if opt.camera:
            return load_calibration(opt.camera).for_frames(src.width, src.height)
        return default_calibration(src.width, src.height, opt.fov, opt.focal)

    def detect(self, src: FrameSource, cal: Calibration):
        from tqdm import tqdm

        from fmgs.trainer.data.humannerf import undistort_image

        from .mediapipe_pose import PoseEstimator

        K_out, (x0, y0, side), size = crop_resize_K(cal.K, src.width, src.height, self.opt.size)
        self.K, self.size = K_out, size
        det_dir = self.state / "detect"
        t0 = time.perf_counter()
        n_new = 0
        estimator = None
        idx = src.indices()
        try:
            for i, rgb in tqdm(src, total=None if idx is None else len(idx), desc="frames",
                               unit="frame", disable=not self.opt.progress):
                name = f"frame_{i:06d}"
                if (det_dir / f"{name}.npz").is_file() and (self.out / "images" / f"{name}.png").is_file():
                    continue
                if estimator is None:
                    estimator = PoseEstimator(video_mode=not self.opt.unordered)
                if cal.dist is not None and np.any(cal.dist != 0):
                    rgb = undistort_image(rgb, cal.K, cal.dist)
                rgb = rgb[y0:y0 + side, x0:x0 + side]
                if size != side:
                    rgb = cv2.resize(rgb, (size, size),
                                     interpolation=cv2.INTER_AREA if size < side else cv2.INTER_LINEAR)
                res = estimator(rgb)
                _write_png(self.out / "images" / f"{name}.png", rgb)
                with atomic_path(det_dir / f"{name}.npz") as tmp:
                    with open(tmp, "wb") as f:
                        np.savez(f, found=res.found, keypoints=res.keypoints, world=res.world,
                                 mask=np.round(res.mask * 255).astype(np.uint8))
                n_new += 1
        finally:
            if estimator is not None:
                estimator.close()
        dt = time.perf_counter() - t0
        self.timings["detect_s"] = dt
        self.timings["detect_frames_new"] = n_new

    def load_detections(self):
        names = sorted(p.stem for p in (self.state / "detect").glob("frame_*.npz"))
        names = [n for n in names if int(n[6:]) in self.selected]
        if len(names) < MIN_FRAMES:
            raise FmgsInputError(f"too few frames: {len(names)} selected, at least "
                                 f"{MIN_FRAMES} needed", self.opt.input)
        d = [np.load(self.state / "detect" / f"{n}.npz") for n in names]
        found = np.array([bool(x["found"]) for x in d])
        kp = np.stack([x["keypoints"] for x in d])
        world = np.stack([x["world"] for x in d])
        soft = np.stack([x["mask"] for x in d]).astype(np.float32) / 255
        return names, found, kp, world, soft

    # ------------------------------------------------------------------ stage 2
    def make_masks(self, names, found, kp, soft, video: bool) -> np.ndarray:
        if self.opt.masks:
            from fmgs.trainer.data.humannerf import read_mask

            mdir = Path(self.opt.masks)
            if not mdir.is_dir():
                raise FmgsInputError("--masks folder not found", mdir)
            out = []
            for n in names:
                cands = [mdir / f"{n}.png"] + ([mdir / f"{self.src_stems[int(n[6:])]}.png"]
                                               if self.src_stems else [])
                f = next((c for c in cands if c.is_file()), None)
                if f is None:
                    raise FmgsInputError(f"no mask for frame {n} ({cands[-1].name})", mdir)
                m = read_mask(f)
                if m.shape != (self.size, self.size):
                    raise FmgsInputError(f"mask is {m.shape[1]}x{m.shape[0]}, the prepared "
                                         f"frames are {self.size}x{self.size}", f)
                out.append(m)
            return np.stack(out)
        sm = soft.copy()
        if video and len(sm) >= 3:
            # a frame without a person keeps its own (empty) mask
            nb = found.astype(np.float32)
            acc = sm * 1.0
            cnt = np.ones(len(sm), np.float32)
            acc[1:] += soft[:-1] * nb[:-1, None, None]
            cnt[1:] += nb[:-1]
            acc[:-1] += soft[1:] * nb[1:, None, None]
            cnt[:-1] += nb[1:]
            sm = np.where(found[:, None, None], acc / cnt[:, None, None], soft)
        masks = (sm > 0.5).astype(np.uint8)
        kept = np.stack([_largest_person_component(m, k) for m, k in zip(masks, kp)])
        self.other_regions = {n: c for n, m, k in zip(names, masks, kept) if (c := other_regions(m, k))}
        if self.other_regions:
            print(f"note: {len(self.other_regions)} frames show other person-sized regions (other people or "
                  "large objects); the tracked person's region is kept (fit_report.json frames.other_regions)")
        return kept

    # ------------------------------------------------------------------ stage 4 helpers
    def overlay(self, rgb, sil, kp):
        img = rgb.copy()
        edge = cv2.morphologyEx(sil, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0
        tint = img.astype(np.float32)
        tint[sil > 0] = 0.55 * tint[sil > 0] + 0.45 * np.array([80, 160, 255])
        img = tint.astype(np.uint8)
        img[edge] = (255, 255, 0)
        from .fit import LANDMARK_MAP

        for li, *_ in LANDMARK_MAP:
            u, v, c = kp[li]
            if c > 0.5:
                cv2.circle(img, (int(round(u)), int(round(v))), max(2, self.size // 200),
                           (255, 40, 40), -1)
        return img


def prepare_video(opt: PrepOptions) -> dict:
    """Run (or resume) ``fmgs-prep video``; returns the fit report (also written to
    ``OUT/fit_report.json``).

    Raises:
        FmgsInputError: unreadable video/folder, wrong-kind camera file, too few frames,
            no person in most frames, an output folder of something else, bad masks.
    """
    t_all = time.perf_counter()
    p = _Prep(opt)
    src = FrameSource(opt.input, opt.start, opt.stop, opt.step)
    p.src_stems = [f.stem for f in src.files] if src.files is not None else None
    cal = p.calibration(src)
    p.open_out()
    sel = src.indices()
    p.selected = None if sel is None else set(sel)
    p.detect(src, cal)
    if p.selected is None:  # video of unknown length: what was decoded is the selection
        p.selected = {int(f.stem[6:]) for f in (p.state / "detect").glob("frame_*.npz")}
    names, found, kp, world, soft = p.load_detections()
    video = not opt.unordered
    n = len(names)
    if found.sum() < max(MIN_FRAMES, MIN_FOUND_FRACTION * n):
        raise FmgsInputError(f"no person found in {n - int(found.sum())} of {n} frames "
                             "(MediaPipe Pose); is one person fully in view?", opt.input)
    t0 = time.perf_counter()
    masks = p.make_masks(names, found, kp, soft, video)
    p.timings["masks_s"] = time.perf_counter() - t0

    # Frames without a person (or with an empty mask) are dropped and reported.
    dropped = {}
    for i, nm in enumerate(names):
        if not found[i]:
            dropped[nm] = "no person detected"
        elif masks[i].sum() < 0.001 * masks[i].size:
            dropped[nm] = "empty person mask"
    keep = np.array([nm not in dropped for nm in names])
    names_k = [nm for nm, k in zip(names, keep) if k]
    kp_k, world_k, masks_k = kp[keep], world[keep], masks[keep]
    for nm in dropped:
        (p.out / "images" / f"{nm}.png").unlink(missing_ok=True)

    from fmgs.body_model import load_smpl
    from fmgs.paths import smpl_neutral_path

    smpl_path = opt.smpl_path or smpl_neutral_path()
    model = load_smpl(smpl_path)
    from .fit import FitConfig, fit_smpl

    cfg = FitConfig() if opt.fit_iters is None else FitConfig(iters=tuple(opt.fit_iters))
    cfg_key = json.dumps(asdict(cfg), sort_keys=True)
    fit_file = p.state / "fit.npz"
    if (fit_file.is_file() and list(np.load(fit_file)["names"]) == names_k
            and str(np.load(fit_file)["cfg"]) == cfg_key):
        z = np.load(fit_file)
        fit = dict(betas=z["betas"], poses=z["poses"], Rh=z["Rh"], Th=z["Th"],
                   reproj_px=z["reproj_px"])
        p.timings["fit_s"] = float(z["fit_s"])
    else:
        small = np.stack([cv2.resize(m, (FIT_MASK_SIZE, FIT_MASK_SIZE),
                                     interpolation=cv2.INTER_AREA) for m in masks_k])
        t0 = time.perf_counter()
        r = fit_smpl(model, p.K, p.size, kp_k, world_k, small, video=video, cfg=cfg,
                     progress=opt.progress)
        fit = dict(betas=r.betas, poses=r.poses, Rh=r.Rh, Th=r.Th, reproj_px=r.reproj_px)
        p.timings["fit_s"] = time.perf_counter() - t0
        p.timings["fit_stages_s"] = r.seconds
        with atomic_path(fit_file) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, names=np.array(names_k), fit_s=p.timings["fit_s"], cfg=cfg_key, **fit)

    # ------------------------------------------------------------------ write
    from tqdm import tqdm

    from fmgs.body_model import axis_angle_to_matrix

    t0 = time.perf_counter()
    _, tpose_joints = model.shape(fit["betas"])
    cams, infos, ious = {}, {}, []
    E = np.eye(4)
    sheet_ids = set(np.linspace(0, len(names_k) - 1, min(12, len(names_k))).round().astype(int))
    sheet, frames_ov = [], []
    ov_side = min(p.size, 384)
    for i, nm in enumerate(tqdm(names_k, desc="write", unit="frame", disable=not opt.progress)):
        _write_png(p.out / "masks" / f"{nm}.png", masks_k[i] * 255)
        verts, joints = model.forward(fit["betas"], fit["poses"][i])
        R = axis_angle_to_matrix(fit["Rh"][i])
        vc = verts @ R.T + fit["Th"][i]
        sil = rasterize_silhouette(vc, model.faces, p.K, p.size)
        ious.append(silhouette_errors(sil, masks_k[i])["iou"])   # masks_k: never empty (dropped above)
        cams[nm] = dict(intrinsics=p.K.astype(np.float32), extrinsics=E.copy(),
                        distortions=np.zeros(5, np.float32))
        infos[nm] = dict(poses=fit["poses"][i].astype(np.float32),
                         Rh=fit["Rh"][i].astype(np.float32), Th=fit["Th"][i].astype(np.float32),
                         joints=joints.astype(np.float32), tpose_joints=tpose_joints.astype(np.float32),
                         betas=fit["betas"].astype(np.float32))
        rgb = cv2.cvtColor(cv2.imread(os.fspath(p.out / "images" / f"{nm}.png")), cv2.COLOR_BGR2RGB)
        ov = p.overlay(rgb, sil, kp_k[i])
        ov = cv2.resize(ov, (ov_side, ov_side), interpolation=cv2.INTER_AREA)
        frames_ov.append(ov)
        if i in sheet_ids:
            sheet.append(cv2.resize(ov, (256, 256), interpolation=cv2.INTER_AREA))
    cols = 4
    while len(sheet) % cols:
        sheet.append(np.zeros_like(sheet[0]))
    grid = np.concatenate([np.concatenate(sheet[r:r + cols], 1) for r in range(0, len(sheet), cols)], 0)
    _write_png(p.out / "contact_sheet.png", grid)
    import imageio.v2 as iio

    with atomic_path(p.out / "overlay.mp4") as tmp:
        w = iio.get_writer(os.fspath(tmp), format="FFMPEG", fps=src.fps or 25, codec="libx264",
                           quality=6, macro_block_size=16)
        for fr in frames_ov:
            w.append_data(fr)
        w.close()
    _write_pickle(p.out / "canonical_joints.pkl",
                  dict(joints=tpose_joints.astype(np.float32), betas=fit["betas"].astype(np.float32)))
    _write_pickle(p.out / "mesh_infos.pkl", infos)
    _write_pickle(p.out / "cameras.pkl", cams)
    p.timings["write_s"] = time.perf_counter() - t0
    total = time.perf_counter() - t_all
    ious_a, rep = np.array(ious), np.asarray(fit["reproj_px"])
    report = dict(
        input=os.path.abspath(opt.input), settings=opt.key(),
        camera=dict(source=cal.source, K_prepared=p.K.tolist(), image_size=p.size,
                    undistorted=bool(cal.dist is not None and np.any(cal.dist != 0))),
        frames=dict(selected=n, written=len(names_k), dropped=dropped,
                    note="one person is tracked (MediaPipe Pose follows the most confident "
                         "detection); masks keep the connected component under its landmarks",
                    other_regions=p.other_regions),
        smpl=dict(model=os.fspath(smpl_path), betas=np.asarray(fit["betas"]).tolist()),
        summary=dict(reproj_px_mean=float(rep.mean()), reproj_px_p95=float(np.percentile(rep, 95)),
                     silhouette_iou_mean=float(ious_a.mean()),
                     silhouette_iou_p5=float(np.percentile(ious_a, 5))),
        per_frame={nm: dict(reproj_px=float(rep[i]), silhouette_iou=ious[i])
                   for i, nm in enumerate(names_k)},
        timings=dict(p.timings, total_s=total,
                     seconds_per_frame=total / max(1, len(names_k))),
    )
    write_json_atomic(p.out / "fit_report.json", report)
    return report
