"""What parts of a trained full-model avatar buy at held-out frames: evaluation-time ablations.

    python benchmarks/component_ablation.py RUN_DIR [--split val] [--variants pose_code_mean,smpl_skinning]
        [--set KEY=VALUE ...] [--max-frames N] [--out DIR] [--block 5] [--json OUT.json]

Renders the split of a ``model.kind=full`` run (``fmgs-eval``'s scoring, no video) once as
trained (``none``) and once per variant, each with one part of the trained avatar replaced and
nothing retrained:

* ``pose_code_mean``: the pose code ``Z_p`` (eq. 3 and 7) fixed to its mean over the training
  frames (their fitted poses plus the learnt per-frame correction, what the fields were trained
  on): the geometry residual and the colour no longer depend on the pose. The difference
  ``none - pose_code_mean`` is what the pose dependence (issue 17, item 3) is worth at those
  frames, in the scoring units;
* ``smpl_skinning``: the learnt skinning field (eq. 9) off: the SMPL weights carried to the
  surfels (``model.full.skinning_field=false``'s weights), same everything else.

Prints per variant the mean PSNR / SSIM / silhouette IoU and the paired per-frame difference
``variant - none`` with the moving-block bootstrap interval of ``paired_eval.py``. Writes
``OUT/<variant>/metrics.json`` (default ``OUT = RUN_DIR/ablation_<split>``; ``metrics.json``'s
``ablation`` names the variant). Bad input (not a run, not a full-model run, an unknown variant)
is reported in one line, exit status 2.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch



def _beside(name: str):
    """The benchmark script ``name.py`` next to this one, as a module."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


paired_eval = _beside("paired_eval")        # block bootstrap of per-frame differences
pose_dependence = _beside("pose_dependence")  # training frames' corrected rotations


class ConstantPoseCode(torch.nn.Module):
    """A pose encoder that returns one fixed code ``(1, D)`` for every pose (batch-expanded)."""

    def __init__(self, code: torch.Tensor):
        super().__init__()
        self.register_buffer("code", code.detach().reshape(1, -1).clone())

    def forward(self, rot: torch.Tensor, joints: torch.Tensor) -> torch.Tensor:
        """``rot (B, 24, 3, 3)`` or ``(24, 3, 3)``; ``joints`` ignored -> ``(B, D)`` copies of the code."""
        b = rot.shape[0] if rot.dim() == 4 else 1
        return self.code.to(device=rot.device).expand(b, -1)


def mean_training_pose_code(train_run) -> torch.Tensor:
    """Mean pose code ``Z_p`` over a run's training frames, as trained.

    Args:
        train_run: :class:`~fmgs.trainer.engine.run.LoadedRun` of split ``train`` of a full run.
    Returns:
        ``(1, D)`` float32: the mean over the training frames ``i`` of the encoder's code at
        ``theta_i + delta_i`` (fitted pose plus the learnt correction of frame ``i``, the
        frame's index in the training split as in training), without the training-time noise.
    """
    from fmgs.trainer.models.full import canonical_pose_joints, normalize_canonical_joints

    model, seq, setup = train_run.model, train_run.seq, train_run.setup
    joints = normalize_canonical_joints(torch.as_tensor(canonical_pose_joints(setup.surfels), dtype=torch.float32))
    with torch.no_grad():
        rots = pose_dependence._frame_rotations(model, setup, seq, range(len(seq)))   # poses only, no image
        return model.pose_encoder(rots.float(), joints).mean(0, keepdim=True)


def pose_code_mean(code: torch.Tensor):
    """The ``pose_code_mean`` change: the run's pose encoder replaced by :class:`ConstantPoseCode`."""
    def change(run):
        run.model.pose_encoder = ConstantPoseCode(code)
    return change


def smpl_skinning(_code=None):
    """The ``smpl_skinning`` change: the run's skinning field removed (SMPL weights)."""
    def change(run):
        run.model.skinning_field = None
    return change


VARIANTS = {"pose_code_mean": pose_code_mean, "smpl_skinning": smpl_skinning}


def _fail(msg: str) -> int:
    print(f"component_ablation: {msg}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--split", choices=("test", "val", "train"), default="val")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of: " + ", ".join(VARIANTS))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override the run's config for the evaluation (e.g. data.val_step=1)")
    ap.add_argument("--max-frames", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None, help="output folder (default RUN_DIR/ablation_<split>)")
    ap.add_argument("--block", type=int, default=5, help="moving-block length of the bootstrap (frames)")
    ap.add_argument("--json", type=Path, default=None, help="also write the summary here")
    a = ap.parse_args(argv)

    from fmgs.config import load_run_config
    from fmgs.errors import FmgsInputError
    from fmgs.trainer.engine.evaluate import evaluate
    from fmgs.trainer.engine.run import load_run

    names = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        return _fail(f"unknown variant(s) {unknown or a.variants!r}; choose from {', '.join(VARIANTS)}")
    try:
        cfg = load_run_config(a.run_dir)
    except FmgsInputError as exc:
        return _fail(str(exc))
    if str(cfg.model.kind) != "full":
        return _fail(f"{a.run_dir} is a model.kind={cfg.model.kind} run; the ablations need a full-model run")
    overrides = tuple(a.overrides)
    out = a.out or Path(a.run_dir) / f"ablation_{a.split}"
    try:
        code = mean_training_pose_code(load_run(a.run_dir, overrides, split="train"))
        runs = {"none": evaluate(a.run_dir, out / "none", a.max_frames, video=False, overrides=overrides,
                                 split=a.split)}
        for v in names:
            runs[v] = evaluate(a.run_dir, out / v, a.max_frames, video=False, overrides=overrides,
                               split=a.split, ablation=(v, VARIANTS[v](code)))
    except FmgsInputError as exc:
        return _fail(str(exc))

    base = {r["frame"]: r for r in runs["none"]["frames"]}
    summary = {"run": str(a.run_dir), "split": a.split, "frames": len(base), "variants": {}}
    print(f"{a.run_dir}, split {a.split}, {len(base)} frames; variant - none, 95% moving-block bootstrap "
          f"({a.block} frames per block)")
    print("| variant | PSNR (dB) | PSNR difference | SSIM difference | IoU difference |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| none | {runs['none']['psnr']:.2f} | | | |")
    for v in names:
        rec = paired_eval.paired_differences(base, {r["frame"]: r for r in runs[v]["frames"]}, a.block, 10000)
        cells = []
        for key, _label in paired_eval.KEYS:
            fmt = "{:+.2f}" if key == "psnr" else "{:+.4f}"
            lo, hi = rec[key]["interval"]
            cells.append(f"{fmt.format(rec[key]['mean_difference'])} [{fmt.format(lo)}, {fmt.format(hi)}]")
        summary["variants"][v] = {"psnr": runs[v]["psnr"], **rec}
        print(f"| {v} | {runs[v]['psnr']:.2f} | " + " | ".join(cells) + " |")
    if a.json:
        a.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
