"""fmgs-ablate: variants get their loss switches, the table is written, finished variants are reused."""
from __future__ import annotations

import json
import os

from omegaconf import OmegaConf

from test_train_e2e import TINY


def test_ablation_runner_tiny(tmp_path, zju377, data_root, monkeypatch):
    from fmgs.trainer.cli.ablate import VARIANTS, ablate_main

    monkeypatch.setenv("FMGS_DATA", str(data_root))
    monkeypatch.chdir(tmp_path)
    data_over = [f"data.root={zju377}", f"data.smpl_path={data_root}/body_models/smpl/SMPL_NEUTRAL.pkl",
                 f"data.parts_path={data_root}/body_models/smpl/smplh_parts_segm.pkl"]
    args = ["--out", str(tmp_path / "abl"), "--variants", "baseline,full-no-coordination",
            *TINY, *data_over, "train.iterations=2", "eval.max_frames=1", "train.checkpoint_every=0"]
    assert ablate_main(args) == 0
    table = json.loads((tmp_path / "abl" / "ablation.json").read_text())
    assert [r["variant"] for r in table["rows"]] == ["baseline", "full-no-coordination"]
    assert all(r["iteration"] == 2 and r["psnr"] > 5 for r in table["rows"])
    md = (tmp_path / "abl" / "ablation.md").read_text().splitlines()
    assert len(md) == 4 and md[2].startswith("| baseline |")

    base = OmegaConf.load(tmp_path / "abl" / "baseline" / "config.yaml")
    nocoord = OmegaConf.load(tmp_path / "abl" / "full-no-coordination" / "config.yaml")
    assert base.model.kind == "full" and base.loss.lambda_depth == 0 and base.loss.lambda_semantic == 0
    assert base.train.coordinated and not nocoord.train.coordinated and nocoord.loss.lambda_depth > 0

    # A second run reuses finished variants (no retraining: checkpoints untouched).
    ck = tmp_path / "abl" / "baseline" / "checkpoints" / "last.pt"
    before = os.stat(ck).st_mtime_ns
    assert ablate_main(args) == 0
    assert os.stat(ck).st_mtime_ns == before
    assert ablate_main(["--out", str(tmp_path / "x"), "--variants", "nope"]) == 2
    assert set(VARIANTS) >= {"baseline", "+Ld+Lsn+Ln+Ls"}
