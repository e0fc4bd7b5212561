"""Does the full model's pose code help at held-out poses? (issue 17, seventh round)

    python benchmarks/pose_code_freeze.py RUN_DIR [--split val|test]

Renders the split's frames of a trained full-model run twice: with the pose code ``Z_p``
of each frame's own pose (what ``fmgs-eval`` does), and with ``Z_p`` frozen to the mean of the
training frames' codes (each at its pose with the learnt per-frame correction). The surfels are
skinned at the frame's own pose both times; only the pose-dependent fields (eq. 3 and 7) see
the frozen code. If freezing costs PSNR, the pose dependence learnt on the training frames
transfers to held-out poses; if it gains, ``Z_p`` acts as a per-frame code that does not.
Prints the mean PSNR of both and their per-frame difference (frozen - own).

Bad input (a missing run, a foundation run) is reported in one line, exit status 2. Run it as
a script: the training frames' rotations come from ``pose_dependence.py`` beside it.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from pose_dependence import _frame_rotations


class FrozenCode(torch.nn.Module):
    """Stands in for the pose encoder: returns the same ``(1, P)`` code for every pose."""

    def __init__(self, code: torch.Tensor):
        super().__init__()
        self.register_buffer("code", code)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.code


def main(argv=None) -> int:
    from fmgs.errors import FmgsInputError
    from fmgs.trainer.engine.metrics import psnr
    from fmgs.trainer.engine.run import heldout_renders, load_run, open_sequence
    from fmgs.trainer.models.fields import normalize_canonical_joints
    from fmgs.trainer.models.full import canonical_pose_joints

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--split", choices=("val", "test"), default="val")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(max(1, a.threads))
    try:
        run = load_run(a.run_dir, (), split=a.split)
        if run.kind != "full":
            raise FmgsInputError(f"not a full-model run (model.kind={run.kind})", a.run_dir)
        train = open_sequence(run.cfg, "train")             # poses only: no image is decoded
    except FmgsInputError as exc:
        print(f"pose_code_freeze: {exc}", file=sys.stderr)
        return 2
    model, setup = run.model, run.setup
    joints = normalize_canonical_joints(torch.as_tensor(canonical_pose_joints(setup.surfels), dtype=torch.float32))
    with torch.no_grad():
        # every training frame at its pose with the learnt correction, as in training
        Z = model.pose_encoder(_frame_rotations(model, setup, train, range(len(train))), joints)
    print(f"training pose codes: {tuple(Z.shape)}, mean |Z_p| {Z.abs().mean():.3f}, "
          f"mean per-dimension std across frames {Z.std(0).mean():.3f}")
    own = [psnr(o.rgb.clamp(0, 1).numpy(), f.image) for f, o in heldout_renders(model, setup, run.seq, run.cfg)]
    model.pose_encoder = FrozenCode(Z.mean(0, keepdim=True))
    frozen = [psnr(o.rgb.clamp(0, 1).numpy(), f.image) for f, o in heldout_renders(model, setup, run.seq, run.cfg)]
    d = np.asarray(frozen) - np.asarray(own)
    print(f"{a.split} ({len(d)} frames): own Z_p {np.mean(own):.2f} dB, frozen mean Z_p {np.mean(frozen):.2f} dB, "
          f"frozen - own {d.mean():+.2f} dB (frozen wins {(d > 0).sum()} / {len(d)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
