"""Device handling of the trainer (``train.device``): what a CUDA run needs, checked here on
the CPU.

* every tensor a model's forward pass reads follows ``model.to(...)`` (a move to the
  ``meta`` device must leave no tensor behind, precomputed hash-grid lookups included);
* ``train.device`` is validated, and ``auto`` resolves to the CPU without gsplat + CUDA;
* training, resuming and evaluating with ``train.device=cpu`` and ``auto`` give the same
  weights as each other on real ZJU-MoCap 377 frames, and a run trained with one device
  setting resumes under the other (checkpoints are device-free).
"""
from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch

from conftest import cuda_available
from fmgs.config import load_config
from fmgs.errors import FmgsInputError

TINY = [
    "data.image_size=48", "data.train_range=[0,12]", "data.train_step=3",
    "data.test_range=[455,470]", "data.test_step=5", "train.log_every=1", "train.image_every=2",
    "train.threads=1", "train.checkpoint_every=0", "train.eval_every=2", "train.eval_frames=1",
]


def _reachable_tensors(module: torch.nn.Module):
    """``(where, tensor)`` for every tensor reachable from the module tree: parameters,
    buffers, and tensors held in plain attributes, directly or one dataclass / container
    deep (e.g. a precomputed hash-grid lookup)."""
    def inside(where, v, depth=0):
        if isinstance(v, torch.Tensor):
            yield where, v
        elif depth < 2 and dataclasses.is_dataclass(v) and not isinstance(v, type):
            for k, x in vars(v).items():
                yield from inside(f"{where}.{k}", x, depth + 1)
        elif depth < 2 and isinstance(v, (list, tuple)):
            for i, x in enumerate(v):
                yield from inside(f"{where}[{i}]", x, depth + 1)

    for mname, mod in module.named_modules():
        for k, v in vars(mod).items():
            if k in ("_parameters", "_buffers"):
                for n, t in v.items():
                    if t is not None:
                        yield f"{mname}.{n}", t
            elif not k.startswith("_modules"):
                yield from inside(f"{mname}.{k}", v)


def _cfg(zju377, smpl_path, *overrides):
    return load_config(None, [
        f"data.root={zju377}", f"data.smpl_path={smpl_path}",
        f"data.parts_path={smpl_path.parent / 'smplh_parts_segm.pkl'}", *TINY, *overrides])


@pytest.fixture(scope="module")
def subject(zju377, smpl_path):
    from fmgs.trainer.engine.run import build_setup, open_sequence

    cfg = _cfg(zju377, smpl_path, "surfels.subdivisions=0")
    return cfg, build_setup(cfg, open_sequence(cfg, "test"))


@pytest.mark.parametrize("kind", ["foundation", "full"])
def test_every_tensor_of_the_model_follows_to(subject, kind):
    """A move to the meta device reaches every tensor the forward pass reads: parameters,
    buffers and the precomputed hash-grid lookups (``_lookup``, ``_skin_lookup``), which
    are plain attributes and so are not moved by ``nn.Module.to`` itself."""
    from fmgs.trainer.engine.run import build_model

    cfg, setup = subject
    cfg = copy.deepcopy(cfg)
    cfg.model.kind = kind
    cfg.model.full.skinning_query = "canonical"           # also the skinning field's own lookup
    model = build_model(cfg, setup, num_frames=4)
    before = dict(_reachable_tensors(model))
    lookups = [w for w in before if "_lookup" in w]
    assert lookups, "the model has no precomputed lookup: the test would not see the case it guards"
    model.to("meta")
    after = dict(_reachable_tensors(model))
    left = sorted(w for w, t in after.items() if t.device.type != "meta")
    assert not left, f"tensors not moved by .to(): {left}"
    assert set(before) <= set(after) | {w for w in before if w.endswith("_csr_t")}


def _meta_render(H: int, W: int, extras: int = 0):
    from fmgs.trainer.render.types import RenderOutput

    e = lambda *shape: torch.zeros(*shape, device="meta")  # noqa: E731
    return RenderOutput(rgb=e(H, W, 3), alpha=e(H, W), depth=e(H, W), depth_acc=e(H, W), depth_median=e(H, W),
                        normal=e(H, W, 3), extras=e(H, W, extras) if extras else None)


@pytest.mark.parametrize("kind", ["foundation", "full"])
def test_training_forward_stays_on_the_model_device(subject, zju377, smpl_path, kind):
    """A model on the ``meta`` device posed for a real training frame (pose correction and pose
    noise included) gives meta outputs, and the foundation losses against the frame's real
    image and mask are meta too: any tensor made on the CPU inside the hot path (bone
    transforms, camera centre, the frame's arrays, random draws) would make these raise.
    (The meta device has no data, so the full model's data-dependent loss terms and the
    rasteriser cannot run on it; the full model's subset skinning update needs its cache flag,
    so the test recomputes every surfel's weights.)"""
    from fmgs.trainer.engine.run import build_model, open_sequence

    cfg, setup = subject
    cfg = copy.deepcopy(cfg)
    cfg.model.kind = kind
    cfg.model.full.skinning_subset = 1.0
    cfg.model.full.pose_noise_p = 1.0
    seq = open_sequence(cfg, "train")
    model = build_model(cfg, setup, num_frames=len(seq)).to("meta")
    fr = seq[1]
    posed = model.pose(fr, setup, frame_id=1, training=True)
    x = posed.render_inputs()
    assert x and all(t.device.type == "meta" for t in x.values()), {k: t.device for k, t in x.items()}
    held_out = model.pose(fr, setup).render_inputs()          # no per-frame correction, no noise
    assert all(t.device.type == "meta" for t in held_out.values())
    if kind == "foundation":
        H, W = fr.image.shape[:2]
        groups = model.loss_groups(cfg, _meta_render(H, W), posed, fr, None, 0,
                                   generator=torch.Generator().manual_seed(0))
        assert set(groups) == {"photometric", "mask_bce"}
        assert all(v.device.type == "meta" for v in groups.values())


def test_double_moves_the_lookup_weights_and_keeps_the_features(subject):
    """``.double()`` casts the lookup's weights with the tables; the canonical features are
    the float32 ones to float32 precision (the lookup is rebuilt, not recomputed)."""
    from fmgs.trainer.engine.run import build_model

    cfg, setup = subject
    torch.manual_seed(0)
    model = build_model(cfg, setup)
    with torch.no_grad():
        f32 = model.canonical_features().clone()
    model.double()
    assert model._lookup.weights.dtype == torch.float64 and model._lookup.indices.dtype == torch.int64
    with torch.no_grad():
        f64 = model.canonical_features()
    assert f64.dtype == torch.float64
    torch.testing.assert_close(f64.float(), f32, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("override, key", [
    ("train.device=gpu", "train.device"),
    ("train.device=CUDA", "train.device"),
])
def test_bad_device_names_the_key(override, key):
    with pytest.raises(FmgsInputError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_gsplat_on_the_cpu_device_is_refused_naming_the_device_key():
    with pytest.raises(FmgsInputError, match=r"train\.device must be cuda or auto with train\.backend=gsplat"):
        load_config(None, ["train.backend=gsplat", "train.device=cpu"])


@pytest.mark.skipif(cuda_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_device_without_cuda_is_a_clear_error():
    from fmgs.trainer.engine.run import check_backend, resolve_device

    cfg = load_config(None, ["train.device=cuda"])
    with pytest.raises(FmgsInputError, match=r"train\.device=cuda: needs a CUDA device"):
        resolve_device(cfg)
    with pytest.raises(FmgsInputError, match=r"train\.device=cuda"):
        check_backend(cfg)


def test_auto_device_follows_the_backend():
    """``auto`` is the CPU with the CPU rasteriser, and with ``backend=auto`` where gsplat or
    CUDA is missing (as on the test machines); ``cuda`` exactly when gsplat would render."""
    from fmgs.trainer.engine.run import resolve_device
    from fmgs.trainer.render.dispatch import gsplat_available

    assert resolve_device(load_config(None, ["train.backend=cpu"])) == torch.device("cpu")
    assert resolve_device(load_config(None, ["train.device=cpu"])) == torch.device("cpu")
    want = "cuda" if gsplat_available() else "cpu"
    assert resolve_device(load_config(None, [])).type == want


def _state(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)


def test_train_resume_and_evaluate_with_cpu_and_auto_devices(tmp_path, zju377, smpl_path):
    """Real frames, 4 iterations: ``train.device=cpu`` and ``auto`` train the same weights
    (on this machine both are the CPU: any stray device or dtype move would change them);
    a 2-iteration ``auto`` run resumed to 4 under ``cpu`` matches too; the held-out
    evaluation and the quick evaluation run from the trained checkpoint."""
    from fmgs.trainer.engine.evaluate import evaluate
    from fmgs.trainer.engine.run import load_run
    from fmgs.trainer.engine.train import train

    runs = {}
    for dev in ("cpu", "auto"):
        cfg = _cfg(zju377, smpl_path, "train.iterations=4", f"train.device={dev}")
        runs[dev] = train(cfg, tmp_path / dev)
    a, b = _state(runs["cpu"]), _state(runs["auto"])
    assert a["iteration"] == b["iteration"] == 4
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k

    cfg = _cfg(zju377, smpl_path, "train.iterations=2", "train.device=auto")
    part = train(cfg, tmp_path / "resumed")
    cfg = _cfg(zju377, smpl_path, "train.iterations=4", "train.device=cpu")
    train(cfg, part, resume=True)
    c = _state(part)
    assert c["iteration"] == 4
    for k in a["model"]:
        torch.testing.assert_close(c["model"][k], a["model"][k], rtol=1e-5, atol=1e-6, msg=k)

    run = load_run(runs["auto"], split="test", device="cpu")
    assert run.device == torch.device("cpu")
    assert all(t.device.type == "cpu" for _, t in _reachable_tensors(run.model))
    m = evaluate(runs["auto"], max_frames=1, video=False)
    assert m["num_frames"] == 1 and 8.0 < m["psnr"] < 60.0
    prog = (runs["cpu"] / "progress.jsonl").read_text().splitlines()
    assert len(prog) == 2 and all(np.isfinite(json.loads(p)["psnr"]) for p in prog)
