"""Does the full model's pose code help at held-out poses? (issue 17, seventh round)

    python benchmarks/pose_code_freeze.py RUN_DIR [--split val|test]

Renders the split's frames of a trained full-model run twice: with the pose code ``Z_p``
of each frame's own pose (what ``fmgs-eval`` does), and with ``Z_p`` frozen to the mean of the
training frames' codes (each at its pose with the learnt per-frame correction). The surfels are
skinned at the frame's own pose both times; only the pose-dependent fields (eq. 3 and 7) see
the frozen code. If freezing costs PSNR, the pose dependence learnt on the training frames
transfers to held-out poses; if it gains, ``Z_p`` acts as a per-frame code that does not.
Prints the mean PSNR of both and their per-frame difference (frozen - own).

Raises SystemExit (from ``load_run``'s error) when the run is missing or is not a full model.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch


def training_pose_codes(run) -> torch.Tensor:
    """``(N, P)`` pose codes of the ``N`` training frames of a loaded run (``split="train"``),
    each at its SMPL pose plus the learnt correction (:func:`~fmgs.trainer.models.full.pose_frame`)."""
    from fmgs.trainer.models.fields import normalize_canonical_joints
    from fmgs.trainer.models.full import canonical_pose_joints, pose_frame

    model, setup = run.model, run.setup
    joints = normalize_canonical_joints(torch.as_tensor(canonical_pose_joints(setup.surfels), dtype=torch.float32))
    codes = []
    with torch.no_grad():
        for i in range(len(run.seq)):
            fr = run.seq[i]
            rot, _ = pose_frame(fr.poses, i, model.pose_correction, setup.rest_joints, setup.canonical_G,
                                fr.world_from_body)
            codes.append(model.pose_encoder(rot, joints))
    return torch.cat(codes)


class FrozenCode(torch.nn.Module):
    """Stands in for the pose encoder: returns the same ``(1, P)`` code for every pose."""

    def __init__(self, code: torch.Tensor):
        super().__init__()
        self.register_buffer("code", code)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.code


def main(argv=None) -> None:
    from fmgs.trainer.engine.metrics import psnr
    from fmgs.trainer.engine.run import heldout_renders, load_run

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--split", choices=("val", "test"), default="val")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)

    train = load_run(a.run_dir, (), split="train")
    if getattr(train.model, "pose_encoder", None) is None:
        raise SystemExit(f"pose_code_freeze: {a.run_dir} is not a full-model run (no pose encoder)")
    Z = training_pose_codes(train)
    print(f"training pose codes: {tuple(Z.shape)}, mean |Z_p| {Z.abs().mean():.3f}, "
          f"mean per-dimension std across frames {Z.std(0).mean():.3f}")
    run = load_run(a.run_dir, (), split=a.split)
    own = [psnr(o.rgb.clamp(0, 1).numpy(), f.image) for f, o in heldout_renders(run.model, run.setup, run.seq, run.cfg)]
    run.model.pose_encoder = FrozenCode(Z.mean(0, keepdim=True))
    frozen = [psnr(o.rgb.clamp(0, 1).numpy(), f.image)
              for f, o in heldout_renders(run.model, run.setup, run.seq, run.cfg)]
    d = np.asarray(frozen) - np.asarray(own)
    print(f"{a.split} ({len(d)} frames): own Z_p {np.mean(own):.2f} dB, frozen mean Z_p {np.mean(frozen):.2f} dB, "
          f"frozen - own {d.mean():+.2f} dB (frozen wins {(d > 0).sum()} / {len(d)})")


if __name__ == "__main__":
    main()
