"""Time per 512^2 frame of each prior producer on ZJU-MoCap 377, and the contact sheet.

Producers timed (median and mean over --frames frames, after one warm-up frame):

* ``body-model``: posing SMPL (NumPy LBS), z-buffer rasterisation, normals and parts
  (:class:`fmgs.priors.BodyModelPriorProducer`), then the same plus writing the four files.
* ``from-sapiens``: reading Sapiens-lite-like ``.npy`` outputs (synthesised from the
  body-model render, normals in the OpenGL convention, seg/depth/normal at 512^2),
  undistorting them with the 377 camera, converting and checking the normals, writing.
* ``sapiens-model``: the TorchScript path with a small stand-in network of the Sapiens
  input/output shapes ((1,3,1024,768) -> (1,C,256,192), a 3-layer strided conv net):
  preprocessing, model, resize back and argmax / renormalisation. It measures the
  pipeline overhead only; a real Sapiens 0.3B-2B model dominates the time (not
  available on these machines).

Usage:
    python benchmarks/bench_priors.py --frames 20 --threads 2 \
        [--contact-sheet docs/priors_contact_sheet.png]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from fmgs.paths import smpl_neutral_path, zju_subject_path
from fmgs.priors import BodyModelPriorProducer, PriorSet, SAPIENS_CLASSES
from fmgs.sapiens import NORMAL_CONVENTIONS, SapiensConverter, read_sapiens_frame, undistort_map
from fmgs.trainer.data.humannerf import HumanNeRFSequence


def _time(fn, names):
    fn(names[0])  # warm-up
    ts = []
    for n in names[1:]:
        t0 = time.perf_counter()
        fn(n)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), statistics.fmean(ts)


def _palette() -> np.ndarray:
    rng = np.random.default_rng(3)
    pal = rng.integers(40, 255, (len(SAPIENS_CLASSES), 3)).astype(np.uint8)
    pal[0] = 0
    return pal


def contact_sheet(seq, prod, names, path: Path, tile: int = 160) -> None:
    """Rows: frames; columns: image / mask / depth / normal / parts (body-model priors)."""
    pal = _palette()
    rows = []
    header = np.full((24, 5 * tile, 3), 255, np.uint8)
    for k, title in enumerate(["image", "mask", "depth", "normal", "parts"]):
        cv2.putText(header, title, (k * tile + 8, 17), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                    (0, 0, 0), 1, cv2.LINE_AA)
    rows.append(header)
    sub = HumanNeRFSequence(seq.root, frames=names, smpl_path=seq.smpl_path)
    for i, name in enumerate(names):
        img, _ = sub.image_uint8(i)
        r = prod.render(name)
        m = r["mask"] > 0
        d = r["depth"]
        dn = np.zeros(d.shape, np.uint8)
        lo, hi = np.nanmin(d), np.nanmax(d)
        dn[m] = (255 * (1 - (d[m] - lo) / max(hi - lo, 1e-6))).astype(np.uint8)  # near = bright
        dcol = cv2.cvtColor(cv2.applyColorMap(dn, cv2.COLORMAP_TURBO), cv2.COLOR_BGR2RGB)
        dcol[~m] = 0
        ncol = np.zeros(img.shape, np.uint8)
        # OpenCV camera axes shown as RGB = (x, -y, -z) * 0.5 + 0.5 (the usual normal-map look)
        ncol[m] = ((r["normal"][m] * [1, -1, -1] * 0.5 + 0.5) * 255).astype(np.uint8)
        cols = [img, np.repeat(r["mask"][..., None], 3, 2), dcol, ncol, pal[r["parts"]]]
        ys, xs = np.nonzero(m)  # square crop around the body, 10 % margin
        cy, cx = (ys.min() + ys.max()) / 2, (xs.min() + xs.max()) / 2
        half = int(0.55 * max(ys.max() - ys.min(), xs.max() - xs.min())) + 1
        y0 = int(np.clip(cy - half, 0, m.shape[0] - 2 * half))
        x0 = int(np.clip(cx - half, 0, m.shape[1] - 2 * half))
        row = np.concatenate([cv2.resize(c[y0:y0 + 2 * half, x0:x0 + 2 * half], (tile, tile),
                                         interpolation=cv2.INTER_AREA) for c in cols], 1)
        cv2.putText(row, name, (4, tile - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (255, 255, 255),
                    1, cv2.LINE_AA)
        rows.append(row)
    sheet = np.concatenate(rows, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR),
                [cv2.IMWRITE_PNG_COMPRESSION, 9])
    print(f"contact sheet: {path} ({path.stat().st_size / 1024:.0f} KB)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (sapiens-model)")
    ap.add_argument("--contact-sheet", type=Path, default=None)
    ap.add_argument("--skip-torch", action="store_true")
    args = ap.parse_args()

    seq = HumanNeRFSequence(zju_subject_path(), split="all", smpl_path=smpl_neutral_path())
    step = max(1, len(seq.all_names) // (args.frames + 1))
    names = seq.all_names[::step][: args.frames + 1]
    prod = BodyModelPriorProducer(seq)
    cam = seq.camera(names[0])
    print(f"ZJU-MoCap 377, {cam.width}x{cam.height}, {len(names) - 1} timed frames")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows.append(("body-model render", *_time(prod.render, names)))
        ps = PriorSet(tmp / "bm")

        def bm_write(n):
            r = prod.render(n)
            ps.write(n, mask=r["mask"], depth=r["depth"], normal=r["normal"], parts=r["parts"])
        rows.append(("body-model render+write", *_time(bm_write, names)))

        # Sapiens-lite-like outputs from the render (OpenGL normals)
        src = tmp / "sap"
        for sub in ("seg", "depth", "normal"):
            (src / sub).mkdir(parents=True)
        signs = np.array(NORMAL_CONVENTIONS["opengl"], np.float32)
        for n in names:
            r = prod.render(n)
            m = r["mask"] > 0
            np.save(src / "seg" / f"{n}_seg.npy", r["parts"].astype(np.int64))
            np.save(src / "seg" / f"{n}.npy", m)
            np.save(src / "depth" / f"{n}.npy", np.where(m, r["depth"], 10.0).astype(np.float32))
            nn = np.where(m[..., None], r["normal"], [0, 0, -1.0]).astype(np.float32)
            np.save(src / "normal" / f"{n}.npy", nn * signs)
        conv = SapiensConverter("auto")
        ps2 = PriorSet(tmp / "sp")

        def sap(n):
            c = seq.camera(n)
            K_raw, _, D = seq._cam_raw[n]
            maps = undistort_map(K_raw, D, c.width, c.height)
            out = conv.convert(read_sapiens_frame(src, n), (c.height, c.width), K=c.K,
                               undistort_maps=maps)
            ps2.write(n, **out)
        rows.append(("from-sapiens convert+check+write", *_time(sap, names)))
        print(f"  (auto-detected source normal convention: {conv.resolved_convention})")

        if not args.skip_torch:
            import torch

            from fmgs.trainer.data.humannerf import read_image, undistort_image
            from fmgs.trainer.data.sapiens_run import SapiensModel

            torch.set_num_threads(args.threads)

            class StandIn(torch.nn.Module):
                def __init__(self, c):
                    super().__init__()
                    self.net = torch.nn.Sequential(
                        torch.nn.Conv2d(3, 16, 3, 2, 1), torch.nn.ReLU(),
                        torch.nn.Conv2d(16, 16, 3, 2, 1), torch.nn.ReLU(),
                        torch.nn.Conv2d(16, c, 1))

                def forward(self, x):
                    return self.net(x)

            models = []
            for task, c in (("seg", 28), ("depth", 1), ("normal", 3)):
                p = tmp / f"standin_{task}.pt2"
                torch.jit.script(StandIn(c).eval()).save(str(p))
                models.append(SapiensModel(p, task=task))

            def run(n):
                K_raw, _, D = seq._cam_raw[n]
                img = undistort_image(read_image(seq.root / "images" / f"{n}.png"), K_raw, D)
                for m in models:
                    m(img)
            rows.append(("sapiens-model (3 stand-in nets)", *_time(run, names)))
    print(f"{'producer':36s} {'median s/frame':>15s} {'mean s/frame':>13s}")
    for name, med, mean in rows:
        print(f"{name:36s} {med:15.4f} {mean:13.4f}")
    if args.contact_sheet is not None:
        sheet_names = [seq.all_names[i] for i in (0, 150, 300, 450)]
        contact_sheet(seq, prod, sheet_names, args.contact_sheet)


if __name__ == "__main__":
    main()
