"""The typed config schema (fmgs/config.py): defaults, type and range checks, the same refusal
of a misspelt key in every CLI, migrated keys, absolute run paths, and a fuzzed parser."""
from __future__ import annotations

import shutil
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from fmgs.config import (
    CHOICES, RANGES, Config, absolute_paths, load_config, load_run_config, save_config, schema,
)
from fmgs.errors import FmgsInputError


def test_schema_is_the_only_source_of_defaults():
    """The structured config and the full model's dataclass agree on every shared default."""
    from fmgs.trainer.models.full import FullModelConfig

    cfg = load_config()
    full = FullModelConfig()
    f = cfg.model.full
    assert (full.static_offsets, full.max_displacement, full.geometry_width, full.skinning_subset,
            full.pose_noise_std, full.pose_noise_p, full.skinning_query, full.appearance_hidden) == (
        f.static_offsets, f.max_displacement, f.geometry_width, f.skinning_subset, f.pose_noise_std,
        f.pose_noise_p, f.skinning_query, f.appearance_hidden)
    assert full.hash_grid.n_levels == cfg.model.hash_grid.n_levels
    assert full.hash_grid.max_resolution == cfg.model.hash_grid.max_resolution


def test_full_model_honours_the_shared_model_keys():
    """model.hash_grid / sh_degree / view_dependent configure the full model too."""
    from fmgs.trainer.models.full import FullModelConfig

    cfg = load_config(None, ["model.kind=full", "model.hash_grid.n_levels=8", "model.sh_degree=2"])
    fc = FullModelConfig.from_run_config(cfg, num_frames=3)
    assert fc.hash_grid.n_levels == 8 and fc.sh_degree == 2 and fc.num_frames == 3
    off = FullModelConfig.from_run_config(load_config(None, ["model.view_dependent=false"]), num_frames=0)
    assert off.sh_degree == -1 and not off.use_pose_correction


@pytest.mark.parametrize("override, key", [
    ("train.iterations=abc", "train.iterations"),
    ("data.image_size=64.7", "data.image_size"),
    ("train.iterations=-3", "train.iterations"),
    ("train.iterations=0", "train.iterations"),
    ("train.log_every=0", "train.log_every"),
    ("data.image_size=3", "data.image_size"),
    ("model.kind=fancy", "model.kind"),
    ("data.train_range=[5,2]", "data.train_range"),
    ("data.test_range=[-1,4]", "data.test_range"),
    ("data.background=[1,2,3]", "data.background"),
    ("train.lr.mlp=-1", "train.lr.mlp"),
    ("loss.lambda_depth=-0.5", "loss.lambda_depth"),
    ("train.max_minutes=nan", "train.max_minutes"),
    ("model.full.skinning_subset=0", "model.full.skinning_subset"),
    ("surfels.init_opacity=1", "surfels.init_opacity"),
    ("train.backend=gsplat", "train.backend"),          # no CUDA / gsplat on the test machines
    ("model.full.geometry_widht=128", "geometry_widht"),
    ("train.iterations", "train.iterations"),           # no '='
])
def test_bad_values_name_the_key(override, key):
    if override == "train.backend=gsplat":
        from fmgs.trainer.render.dispatch import gsplat_available

        if gsplat_available():
            pytest.skip("gsplat and CUDA are present here: the back-end is valid")
    with pytest.raises(FmgsInputError) as exc:
        load_config(None, [override])
    assert key in str(exc.value)


def test_every_choice_and_range_refers_to_a_real_key():
    values = OmegaConf.to_container(schema())

    def get(path):
        node = values
        for k in path.split("."):
            node = node[k]
        return node

    for key in [*CHOICES, *RANGES]:
        get(key)   # KeyError if a table names a key the schema does not have
    for key, allowed in CHOICES.items():
        assert get(key) in allowed, key


def _run_folder(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    save_config(load_config(), run / "config.yaml")
    return run


def test_a_misspelt_key_fails_in_every_cli(tmp_path, capsys):
    """fmgs-train, fmgs-eval --set, fmgs-export --set and fmgs-ablate: exit 2, the key named."""
    from fmgs.export.cli import main as export_main
    from fmgs.trainer.cli.ablate import ablate_main
    from fmgs.trainer.cli.main import eval_main, train_main

    run = _run_folder(tmp_path)
    bad = "model.full.geometry_widht=128"
    calls = {
        "fmgs-train": lambda: train_main(["--out", str(tmp_path / "t"), bad]),
        "fmgs-eval": lambda: eval_main([str(run), "--set", bad]),
        "fmgs-export": lambda: export_main([str(run), "--out", str(tmp_path / "b"), "--set", bad]),
        "fmgs-ablate": lambda: ablate_main(["--out", str(tmp_path / "a"), "--variants", "baseline", bad]),
    }
    for name, call in calls.items():
        assert call() == 2, name
        err = capsys.readouterr().err
        assert "geometry_widht" in err and "Traceback" not in err, (name, err)
    assert not (tmp_path / "t").exists() and not (tmp_path / "b").exists()


def test_show_config_prints_the_resolved_config(capsys):
    from fmgs.trainer.cli.main import train_main

    assert train_main(["--show-config", "train.iterations=7"]) == 0
    printed = OmegaConf.create(capsys.readouterr().out)
    assert printed.train.iterations == 7 and printed.model.kind == "foundation"


def test_old_run_configs_load_with_moved_keys(tmp_path):
    run = tmp_path / "old"
    run.mkdir()
    old = OmegaConf.to_container(load_config())
    old["model"].pop("foundation")
    old["model"].update(color_mlp_width=32, color_mlp_layers=1, learn_displacement=False)
    OmegaConf.save(OmegaConf.create(old), run / "config.yaml")
    cfg = load_run_config(run)
    assert (cfg.model.foundation.color_mlp_width, cfg.model.foundation.color_mlp_layers,
            cfg.model.foundation.learn_displacement) == (32, 1, False)


def test_run_paths_are_absolute_and_missing_parts_file_is_an_error(tmp_path):
    cfg = load_config(None, ["data.root=seq", "data.smpl_path=smpl.pkl", "data.parts_path=null"])
    absolute_paths(cfg, base=tmp_path)
    assert cfg.data.root == str((tmp_path / "seq").resolve())
    assert cfg.data.smpl_path == str((tmp_path / "smpl.pkl").resolve())
    with pytest.raises(FmgsInputError, match="data.parts_path"):
        absolute_paths(load_config(None, ["data.parts_path=nowhere.pkl"]), base=tmp_path)


def test_eval_max_frames_zero_keeps_the_old_metrics(tmp_path, capsys):
    """fmgs-eval --max-frames 0 is refused before anything in RUN/eval is touched."""
    from fmgs.trainer.cli.main import eval_main

    run = _run_folder(tmp_path)
    (run / "eval").mkdir()
    (run / "eval" / "metrics.json").write_text('{"psnr": 31.0}')
    assert eval_main([str(run), "--max-frames", "0"]) == 2
    assert "--max-frames" in capsys.readouterr().err
    assert (run / "eval" / "metrics.json").read_text() == '{"psnr": 31.0}'


_KEYS = [k for k in RANGES] + list(CHOICES) + ["model.full.geometry_widht", "nope", "data", "train.lr"]
_VALUES = st.one_of(st.integers(-10**6, 10**6).map(str), st.floats(allow_nan=True).map(repr),
                    st.text(string.printable, max_size=12), st.sampled_from(["[]", "[1,2]", "{}", "null", "true"]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.tuples(st.sampled_from(_KEYS), _VALUES).map(lambda kv: f"{kv[0]}={kv[1]}"),
                          st.text(string.printable, max_size=20)), max_size=4))
def test_fuzzed_overrides_give_a_valid_config_or_a_clean_error(overrides):
    """Whatever the command line holds: a validated config, or FmgsInputError; nothing else."""
    try:
        cfg = load_config(None, overrides)
    except FmgsInputError:
        return
    assert isinstance(OmegaConf.to_object(cfg), Config)
    assert cfg.train.iterations >= 1 and cfg.data.image_size >= 16


def _data_overrides(zju377, data_root):
    return [f"data.root={zju377}", f"data.smpl_path={data_root}/body_models/smpl/SMPL_NEUTRAL.pkl",
            f"data.parts_path={data_root}/body_models/smpl/smplh_parts_segm.pkl", "data.image_size=64"]


@pytest.mark.parametrize("split, override", [
    ("train", "data.train_range=[600,700]"),      # beyond the 570 frames of 377
    ("test", "data.test_range=[569,570]"),        # one frame, but a step that still selects it ...
])
def test_split_selecting_no_frame_names_the_key(zju377, data_root, split, override):
    from fmgs.trainer.engine.run import open_sequence

    cfg = load_config(None, [*_data_overrides(zju377, data_root), override])
    if split == "test":            # ... is fine; an out-of-range one is not
        assert len(open_sequence(cfg, "test")) == 1
        cfg = load_config(None, [*_data_overrides(zju377, data_root), "data.test_range=[1000,1200]"])
    with pytest.raises(FmgsInputError, match=f"data.{split}_range"):
        open_sequence(cfg, split)


def test_preview_and_train_without_training_frames_write_nothing(zju377, data_root, tmp_path, capsys):
    from fmgs.trainer.cli.main import train_main

    args = [*_data_overrides(zju377, data_root), "data.train_range=[600,700]"]
    assert train_main(["--preview", "--out", str(tmp_path / "p"), *args]) == 2
    assert "data.train_range" in capsys.readouterr().err
    assert not (tmp_path / "p" / "preview").exists()
    assert train_main(["--out", str(tmp_path / "t"), *args]) == 2
    assert not (tmp_path / "t" / "checkpoints").exists()


def test_missing_parts_file_is_an_error(zju377, data_root, tmp_path, capsys):
    from fmgs.trainer.cli.main import train_main

    bad = [*_data_overrides(zju377, data_root), f"data.parts_path={tmp_path}/nope.pkl"]
    assert train_main(["--out", str(tmp_path / "t"), *bad]) == 2
    assert "data.parts_path" in capsys.readouterr().err


def test_ablate_with_no_variant_is_an_error(tmp_path, capsys):
    from fmgs.trainer.cli.ablate import ablate_main

    assert ablate_main(["--out", str(tmp_path / "a"), "--variants", ","]) == 2
    assert "no ablation variant" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


OLDEST_RUN_CONFIG = Path(__file__).parent / "fixtures" / "run_config_9efe2f9.yaml"


def _keys(node, prefix=""):
    for k, v in node.items():
        if isinstance(v, dict):
            yield from _keys(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}"


def test_every_key_added_since_the_first_schema_says_how_older_runs_behave():
    """A key added to the schema without an ADDED_KEYS entry would give old runs today's
    default on resume/eval/export; this fails until the new key is registered."""
    from fmgs.config import ADDED_KEYS, MOVED_KEYS

    oldest = set(_keys(OmegaConf.to_container(OmegaConf.load(OLDEST_RUN_CONFIG))))
    today = set(_keys(OmegaConf.to_container(schema())))
    assert today - (oldest - set(MOVED_KEYS)) == set(ADDED_KEYS)
    for key, value in ADDED_KEYS.items():   # each legacy value passes today's checks
        load_config(None, [f"{key}={value}"] if not isinstance(value, list) else [])


def test_an_old_run_keeps_the_behaviour_it_was_trained_with(tmp_path):
    """The oldest saved config resumes with the pose input and losses it was trained with,
    not today's defaults, and says so; a run saved today loads unchanged and silently."""
    from fmgs.config import ADDED_KEYS

    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(OLDEST_RUN_CONFIG, old / "config.yaml")
    told = []
    cfg = load_run_config(old, notify=told.append)
    for key, value in ADDED_KEYS.items():
        assert OmegaConf.select(cfg, key) == value, key
    assert cfg.model.full.pose_input == "rotation" and cfg.loss.lambda_scale_growth == 0.0
    assert cfg.model.densify.final_prune_opacity == 0.0
    assert len(told) == 1 and str(old / "config.yaml") in told[0]
    for key in ("model.full.pose_input=rotation", "loss.lambda_scale_growth=0.0",
                "model.densify.final_prune_opacity=0.0"):
        assert key in told[0]
    # an override still wins over the kept behaviour
    assert load_run_config(old, ["loss.lambda_scale_growth=0.1"]).loss.lambda_scale_growth == 0.1

    new = tmp_path / "new"
    new.mkdir()
    today = load_config(None, ["model.kind=full"])
    save_config(today, new / "config.yaml")
    told.clear()
    assert OmegaConf.to_container(load_run_config(new, notify=told.append)) == OmegaConf.to_container(today)
    assert told == []
