"""Run Sapiens TorchScript checkpoints (seg / depth / normal) on a sequence's images.

Follows the preprocessing of the Sapiens "lite" demo scripts: the RGB image is resized to
the model input of 1024 x 768 (H x W) with bilinear interpolation (no padding, the aspect
ratio is not kept), normalised per channel with mean (123.675, 116.28, 103.53) and
std (58.395, 57.12, 57.375) on the 0..255 RGB values, and fed as a (1, 3, 1024, 768)
float32 tensor. The output (1, C, h, w) is resized back to the image size bilinearly;
the task is recognised from C: 28 = body-part segmentation (argmax -> class ids),
1 = relative depth, 3 = surface normals (renormalised to unit length). Outputs are
returned in Sapiens' own conventions (the normal axes are converted later by
:class:`fmgs.sapiens.SapiensConverter`).

No download code: the user passes the checkpoint files (``*_torchscript.pt2``) they have.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fmgs.errors import FmgsInputError
from fmgs.priors import NUM_SAPIENS_CLASSES

__all__ = ["SAPIENS_INPUT_HW", "SAPIENS_MEAN", "SAPIENS_STD", "SapiensModel",
           "preprocess", "load_sapiens_models", "run_models"]

SAPIENS_INPUT_HW = (1024, 768)
SAPIENS_MEAN = (123.675, 116.28, 103.53)
SAPIENS_STD = (58.395, 57.12, 57.375)
_TASK_OF_CHANNELS = {NUM_SAPIENS_CLASSES: "seg", 1: "depth", 3: "normal"}


def preprocess(image_rgb: np.ndarray, device="cpu", input_hw=SAPIENS_INPUT_HW) -> torch.Tensor:
    """(H, W, 3) uint8 RGB image -> (1, 3, 1024, 768) float32 normalised tensor on ``device``."""
    img = torch.from_numpy(np.ascontiguousarray(image_rgb)).to(device)
    x = img.permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=tuple(input_hw), mode="bilinear", align_corners=False)
    mean = torch.tensor(SAPIENS_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(SAPIENS_STD, device=device).view(1, 3, 1, 1)
    return (x - mean) / std


class SapiensModel:
    """One Sapiens TorchScript checkpoint.

    Args:
        path: TorchScript file (``torch.jit.load``; a ``torch.export`` ``.pt2`` archive is
            tried with ``torch.export.load`` when TorchScript loading fails).
        device: ``"cpu"``, ``"cuda"`` or a torch device.
        task: ``"seg"``, ``"depth"`` or ``"normal"``; None = detect from the output
            channels on the first call (28 / 1 / 3).
    Raises:
        FmgsInputError: missing or unloadable file.
    """

    def __init__(self, path, device="cpu", task: str | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise FmgsInputError("Sapiens checkpoint not found", self.path)
        self.device = torch.device(device)
        try:
            self.module = torch.jit.load(str(self.path), map_location=self.device)
        except Exception as exc_jit:  # noqa: BLE001 - report both loaders' errors
            try:
                self.module = torch.export.load(str(self.path)).module().to(self.device)
            except Exception as exc_exp:  # noqa: BLE001
                raise FmgsInputError(
                    f"cannot load as TorchScript ({exc_jit}) or torch.export ({exc_exp})",
                    self.path) from None
        if hasattr(self.module, "eval"):
            self.module.eval()
        if task is not None and task not in ("seg", "depth", "normal"):
            raise FmgsInputError(f"unknown Sapiens task {task!r}", self.path)
        self.task = task

    @torch.inference_mode()
    def __call__(self, image_rgb: np.ndarray) -> np.ndarray:
        """Run on one (H, W, 3) uint8 RGB image.

        Returns:
            seg: (H, W) int64 class ids; depth: (H, W) float32; normal: (H, W, 3)
            float32 unit vectors (Sapiens axes).
        Raises:
            FmgsInputError: output not (1, C, h, w), or C not matching the task.
        """
        H, W = image_rgb.shape[:2]
        y = self.module(preprocess(image_rgb, self.device))
        if isinstance(y, (tuple, list)):
            y = y[0]
        if y.ndim != 4 or y.shape[0] != 1:
            raise FmgsInputError(f"model output must be (1, C, h, w), got {tuple(y.shape)}",
                                 self.path)
        task = _TASK_OF_CHANNELS.get(int(y.shape[1]))
        if self.task is None:
            if task is None:
                raise FmgsInputError(
                    f"cannot tell the task from {y.shape[1]} output channels (28 = seg, "
                    "1 = depth, 3 = normal)", self.path)
            self.task = task
        elif task != self.task:
            raise FmgsInputError(f"{self.task} model returned {y.shape[1]} channels", self.path)
        y = F.interpolate(y.float(), size=(H, W), mode="bilinear", align_corners=False)[0]
        if self.task == "seg":
            return y.argmax(0).cpu().numpy().astype(np.int64)
        if self.task == "depth":
            return y[0].cpu().numpy().astype(np.float32)
        n = y / y.norm(dim=0, keepdim=True).clamp_min(1e-8)
        return n.permute(1, 2, 0).cpu().numpy().astype(np.float32)


def load_sapiens_models(paths, device="cpu") -> list[SapiensModel]:
    """Load several checkpoints; the task of each is taken from its file name when it
    contains ``seg``, ``depth`` or ``normal`` (else detected from its output channels).

    Raises:
        FmgsInputError: a file is missing/unloadable, or two files claim the same task.
    """
    models = []
    for p in paths:
        stem = Path(p).name.lower()
        task = next((t for t in ("seg", "depth", "normal") if t in stem), None)
        models.append(SapiensModel(p, device=device, task=task))
    tasks = [m.task for m in models if m.task]
    if len(tasks) != len(set(tasks)):
        raise FmgsInputError(f"two Sapiens checkpoints for the same task: {tasks}")
    return models


def run_models(models, image_rgb: np.ndarray) -> dict:
    """Run every model on one image; returns the raw dict of
    :func:`fmgs.sapiens.read_sapiens_frame` (``seg``/``seg_mask``/``depth``/``normal``).

    ``seg_mask`` is ``seg > 0`` (as the lite seg script's foreground mask).
    """
    raw: dict = dict(seg=None, seg_mask=None, depth=None, normal=None, paths={})
    for m in models:
        out = m(image_rgb)
        raw[m.task] = out
        raw["paths"][m.task] = m.path
    if raw["seg"] is not None:
        raw["seg_mask"] = raw["seg"] > 0
    return raw
