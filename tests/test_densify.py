"""Mesh-guided densification and free canonical offsets.

* :func:`fmgs.densify.subdivide_faces` keeps the surface: children lie on their parent face
  at the expected barycentric coordinates, with the parent's normal, half its scale, its
  part label, and SMPL's skinning weights at their centres (brute force in float64 from
  the SMPL mesh, independent of the subdivided mesh's vertex weights).
* the optimiser state follows the parameters (shapes, carried rows, a working next step).
* resuming across a densification equals the uninterrupted run.
* a densified avatar exports to a fixed buffer that the torch-free runtime plays like the trainer.
"""
from __future__ import annotations

import contextlib
import io
import os
import signal

import numpy as np
import pytest
import torch

from fmgs.densify import CHILD_BARY, subdivide_faces

TINY = ["data.image_size=64", "data.train_range=[0,12]", "data.train_step=3", "data.test_range=[455,460]",
        "data.test_step=5", "train.log_every=1", "train.image_every=0", "train.threads=1",
        "train.eval_at_end=false"]
# the un-subdivided template (13,776 surfels) keeps the end-to-end tests fast
DENSE = ["surfels.subdivisions=0", "model.offsets.enabled=true", "model.densify.at=[0.5]", "model.densify.fraction=0.02",
         "model.densify.prune_opacity=0.8995",
         "train.iterations=10", "train.lr_final_ratio=0.1"]


@pytest.fixture(scope="module")
def template(smpl_path):
    """SMPL surfels with no subdivision (13,776 faces: fast)."""
    from fmgs.body_model import load_smpl
    from fmgs.surfels import build_canonical_surfels

    smpl = load_smpl(smpl_path)
    return smpl, build_canonical_surfels(smpl, np.linspace(-1, 1, 10), subdivisions=0)


def _bary64(tri: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Barycentric coordinates of points ``p (N,3)`` in triangles ``tri (N,3,3)``, float64
    least squares with the sum-to-one row (independent of the module's formula)."""
    out = []
    for t, x in zip(tri.astype(np.float64), p.astype(np.float64)):
        A = np.vstack([t.T, np.ones(3)])
        out.append(np.linalg.lstsq(A, np.append(x, 1.0), rcond=None)[0])
    return np.asarray(out)


def test_children_stay_on_the_parent_face_with_exact_attributes(template):
    smpl, s = template
    rng = np.random.default_rng(0)
    ids = np.unique(rng.choice(s.num_surfels, 300, replace=False))
    d, src = subdivide_faces(s, ids)
    n_keep = s.num_surfels - len(ids)
    assert d.num_surfels == s.num_surfels + 3 * len(ids) and src.shape == (d.num_surfels,)
    np.testing.assert_array_equal(src[n_keep:], np.repeat(ids, 4))
    # unsplit surfels unchanged
    keep = np.setdiff1d(np.arange(s.num_surfels), ids)
    np.testing.assert_array_equal(d.centers[:n_keep], s.centers[keep])
    np.testing.assert_array_equal(d.skin_weights[:n_keep], s.skin_weights[keep])
    # children: on the parent face at CHILD_BARY, same normal, half the scale, same label / SMPL face
    par = np.repeat(ids, 4)
    ptri = s.verts[s.faces[par]]
    b = _bary64(ptri, d.centers[n_keep:])
    np.testing.assert_allclose(b, np.tile(CHILD_BARY, (len(ids), 1)), atol=2e-5)
    plane = np.einsum("sj,sj->s", d.centers[n_keep:] - ptri[:, 0], s.normals[par])
    assert np.abs(plane).max() < 1e-6
    np.testing.assert_allclose(d.normals[n_keep:], s.normals[par], atol=1e-4)   # float32 vertices
    np.testing.assert_allclose(d.scales[n_keep:], 0.5 * s.scales[par], rtol=1e-6)
    np.testing.assert_array_equal(d.part_labels[n_keep:], s.part_labels[par])
    np.testing.assert_array_equal(d.parent_face[n_keep:], s.parent_face[par])
    # skinning weights: SMPL's per-vertex weights interpolated at the child centre (brute force)
    smpl_tri = s.smpl_verts[s.smpl_faces[d.parent_face[n_keep:]]]
    bs = _bary64(smpl_tri, d.centers[n_keep:])
    W = np.asarray(smpl.weights, np.float64)[s.smpl_faces[d.parent_face[n_keep:]]]
    ref = np.einsum("sk,skj->sj", bs, W)
    np.testing.assert_allclose(d.skin_weights[n_keep:], ref, atol=2e-5)
    np.testing.assert_allclose(d.parent_bary[n_keep:], bs, atol=2e-5)
    # the children tile the parent: their areas sum to the parent's
    e = lambda t: 0.5 * np.linalg.norm(np.cross(t[:, 1] - t[:, 0], t[:, 2] - t[:, 0]), axis=1)  # noqa: E731
    np.testing.assert_allclose(e(d.verts[d.faces[n_keep:]].astype(np.float64)).reshape(-1, 4).sum(1),
                               e(s.verts[s.faces[ids]].astype(np.float64)), rtol=1e-4)


def test_second_step_reuses_midpoints_and_keeps_adjacency(template):
    _, s = template
    adj0 = s.face_adjacency
    i, j = (int(x) for x in adj0[0])                  # two faces sharing an edge
    d1, _ = subdivide_faces(s, [i])
    # the unsplit neighbour j touches exactly the two children of i along the shared edge
    children = np.arange(d1.num_surfels - 4, d1.num_surfels)
    jn = j - 1                                          # unsplit faces keep their order (i < j removed)
    nb = {int(b) for a, b in d1.face_adjacency if a == jn} | {int(a) for a, b in d1.face_adjacency if b == jn}
    assert len(nb & set(children.tolist())) == 2
    # splitting j too reuses the hanging midpoint: no two vertices at the same position
    d2, _ = subdivide_faces(d1, [jn])
    assert len(np.unique(d2.verts, axis=0)) == len(d2.verts)
    assert len(d2.verts) == len(d1.verts) + 2           # j's two other edges only
    deg = np.bincount(d2.face_adjacency.ravel(), minlength=d2.num_surfels)
    assert deg.min() >= np.bincount(adj0.ravel()).min()


def test_pruned_faces_leave_with_their_surfels(template):
    _, s = template
    d, src = subdivide_faces(s, [5, 9], remove_ids=[0, 7])
    assert d.num_surfels == s.num_surfels + 6 - 2 and len(d.faces) == d.num_surfels
    assert 0 not in src and 7 not in src
    keep = np.setdiff1d(np.arange(s.num_surfels), [0, 5, 7, 9])
    np.testing.assert_array_equal(d.centers[:len(keep)], s.centers[keep])
    assert d.face_adjacency.max() < d.num_surfels
    d2, src2 = subdivide_faces(s, [], remove_ids=[3])
    assert d2.num_surfels == s.num_surfels - 1 and 3 not in src2


def test_bad_face_ids_are_a_clear_error(template):
    from fmgs.errors import FmgsInputError

    _, s = template
    with pytest.raises(FmgsInputError, match="densification face ids"):
        subdivide_faces(s, [s.num_surfels])
    with pytest.raises(FmgsInputError, match="both split and removed"):
        subdivide_faces(s, [1, 2], remove_ids=[2])


def test_offset_laplacian_is_zero_for_constant_offsets_and_matches_brute_force():
    from fmgs.trainer.losses.terms import offset_laplacian_loss

    pairs = torch.tensor([[0, 1], [1, 2], [0, 2], [2, 3]])
    const = torch.full((5, 3), 0.3, dtype=torch.float64)
    assert float(offset_laplacian_loss(const, pairs)) < 1e-30
    o = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    nb = {0: [1, 2], 1: [0, 2], 2: [1, 0, 3], 3: [2], 4: []}
    ref = np.mean([np.sum((o[i].numpy() - o[nb[i]].numpy().mean(0)) ** 2) if nb[i] else 0.0 for i in range(5)])
    assert abs(float(offset_laplacian_loss(o, pairs)) - ref) < 1e-12


@pytest.mark.parametrize("kind", ["foundation", "full"])
def test_optimizer_state_follows_the_densified_parameters(kind, zju377, data_root):
    from fmgs.config import load_config
    from fmgs.trainer.engine.run import build_setup, make_optimizer, open_sequence
    from fmgs.trainer.models.densify import densify_model
    from fmgs.trainer.engine.run import MODELS

    os.environ["FMGS_DATA"] = str(data_root)
    cfg = load_config(None, [*TINY, f"model.kind={kind}", "model.offsets.enabled=true", "surfels.subdivisions=0",
                             "model.full.semantic_field=false", "model.full.skinning_field=false"])
    seq = open_sequence(cfg, "train")
    setup = build_setup(cfg, seq)
    torch.manual_seed(0)
    model = MODELS[kind].from_config(cfg, setup, num_frames=len(seq))
    opt = make_optimizer(cfg, model)
    fr = seq[0]
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        posed = model.pose(fr, setup, frame_id=0, training=True)
        out = model.render(posed, fr.camera, cfg)
        sum(model.loss_groups(cfg, out, posed, fr, None, 0).values()).backward()
        opt.step()
    n0 = model.num_surfels
    before = {name: (getattr(model, name).detach().clone(), {k: v.clone() for k, v in opt.state[getattr(model, name)]
                                                             .items()})
              for name in model.per_surfel_parameters() if getattr(model, name, None) is not None}
    ids = np.arange(0, n0, 50)
    src = densify_model(model, ids, opt)
    assert model.num_surfels == n0 + 3 * len(ids) == len(src)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    for name, (val, st) in before.items():
        p = getattr(model, name)
        assert id(p) in in_opt and p.shape[0] == model.num_surfels
        torch.testing.assert_close(p.detach(), val[src])
        for k, v in opt.state[p].items():
            if v.dim() > 0:
                assert v.shape == p.shape, (name, k)
                torch.testing.assert_close(v, st[k][src])
            else:
                torch.testing.assert_close(v, st[k])
    assert all(id(p) in in_opt for p in model.parameters() if p.requires_grad)
    opt.zero_grad(set_to_none=True)                    # and training goes on at the new size
    posed = model.pose(fr, setup, frame_id=0, training=True)
    out = model.render(posed, fr.camera, cfg)
    sum(model.loss_groups(cfg, out, posed, fr, None, 2).values()).backward()
    opt.step()
    assert posed.means.shape[0] == model.num_surfels


def _train(out, data_root, extra, stop_after=None, resume=False):
    """In-process ``fmgs-train``; ``stop_after=k`` delivers SIGINT during iteration ``k``
    (0-based), as Ctrl-C would: the run checkpoints after that iteration and stops."""
    import fmgs.trainer.engine.train as T
    from fmgs.trainer.cli.main import train_main

    os.environ["FMGS_DATA"] = str(data_root)
    orig = T.apply_lr_schedule

    def schedule(cfg, opt, it):
        if stop_after is not None and it == stop_after:
            os.kill(os.getpid(), signal.SIGINT)
        return orig(cfg, opt, it)

    T.apply_lr_schedule = schedule
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            argv = ["--resume", str(out)] if resume else ["--out", str(out), "--no-eval", *TINY, *extra]
            return train_main(argv)
    finally:
        T.apply_lr_schedule = orig


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory, zju377, data_root):
    run = tmp_path_factory.mktemp("dense") / "ref"
    assert _train(run, data_root, DENSE) == 0
    return run


def test_resume_across_a_densification_equals_an_uninterrupted_run(dense_run, tmp_path, data_root):
    ref = torch.load(dense_run / "checkpoints" / "last.pt", weights_only=True)
    info = ref["model_info"]
    step = info["densify"][0]
    assert len(info["densify"]) == 1 and len(step["remove"]) > 0
    assert info["num_surfels"] == 13776 + 3 * len(step["split"]) - len(step["remove"])
    run = tmp_path / "run"
    assert _train(run, data_root, DENSE, stop_after=2) == 130          # before the step at 5
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model_info"]["num_surfels"] == 13776
    assert _train(run, data_root, [], stop_after=6, resume=True) == 130  # after it: replayed on resume
    mid = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert mid["iteration"] == 7 and mid["model_info"]["num_surfels"] == info["num_surfels"]
    assert _train(run, data_root, [], resume=True) == 0
    got = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert got["model_info"]["densify"] == info["densify"]
    for k, v in ref["model"].items():
        torch.testing.assert_close(got["model"][k], v, rtol=1e-4, atol=1e-5, msg=f"{k} differs after resume")


def test_densified_avatar_exports_and_plays(dense_run, tmp_path):
    from fmgs.bundle import read_bundle
    from fmgs.export.api import export_run
    from fmgs.runtime.pipeline import AvatarPipeline
    from fmgs.trainer.engine.run import load_run
    from fmgs.trainer.models.base import frame_bone_transforms

    rep = export_run(dense_run, tmp_path / "bundle", parity_frames=1, trt="off", verbose=False)
    assert rep["parity"]["passed"]
    run = load_run(dense_run, split="test")
    b = read_bundle(tmp_path / "bundle")
    assert b.surfels["centers"].shape[0] == run.model.num_surfels != 13776
    np.testing.assert_allclose(b.surfels["centers"], run.model.static_centers().detach().numpy(), atol=1e-6)
    fr = run.seq[0]
    cam = np.asarray(fr.camera.center, np.float64)
    pipe = AvatarPipeline(tmp_path / "bundle", array_backend="numpy", inference_backend="onnxruntime",
                          providers="cpu", threads=1, drop_invisible=False)
    got = pipe.posed_surfels(np.asarray(fr.poses).reshape(24, 3), fr.world_from_body, cam)
    B = frame_bone_transforms(run.setup.smpl, run.setup.rest_joints, run.setup.canonical_G, fr.poses,
                              fr.world_from_body)
    with torch.no_grad():
        ref = run.model(torch.as_tensor(B, dtype=torch.float32), torch.as_tensor(cam, dtype=torch.float32))
    for k in ("means", "scales", "colors", "opacities"):
        np.testing.assert_allclose(got[k], getattr(ref, k).numpy(), atol=2e-5, rtol=0, err_msg=k)


def test_end_of_training_pruning_drops_exactly_the_transparent_surfels(tmp_path, zju377, data_root):
    """``model.densify.final_prune_opacity=t``: the checkpoint of a run equals the same run
    without pruning (deterministic training) restricted to the surfels whose opacity is
    >= t, the step is recorded for replay (eval / export rebuild the pruned buffer), and a
    threshold above every opacity prunes nothing (never an empty avatar)."""
    from fmgs.trainer.engine.run import load_run

    base = ["surfels.subdivisions=0", "train.iterations=6"]
    t = 0.8995
    assert _train(tmp_path / "keep", data_root, [*base, "model.densify.final_prune_opacity=0"]) == 0
    assert _train(tmp_path / "pruned", data_root, [*base, f"model.densify.final_prune_opacity={t}"]) == 0
    ref = torch.load(tmp_path / "keep" / "checkpoints" / "last.pt", weights_only=True)
    got = torch.load(tmp_path / "pruned" / "checkpoints" / "last.pt", weights_only=True)
    low = np.nonzero(torch.sigmoid(ref["model"]["opacity_logit"]).numpy() < t)[0]
    keep = np.setdiff1d(np.arange(13776), low)
    assert 0 < len(low) < 13776
    assert ref["model_info"].get("densify") in (None, [])
    steps = got["model_info"]["densify"]
    assert len(steps) == 1 and len(steps[0]["split"]) == 0
    np.testing.assert_array_equal(np.asarray(steps[0]["remove"]), low)
    assert got["model_info"]["num_surfels"] == len(keep)
    for k, v in ref["model"].items():
        w = got["model"][k]
        if v.shape[:1] == (13776,):
            torch.testing.assert_close(w, v[torch.as_tensor(keep)], rtol=0, atol=0, msg=k)
        else:
            torch.testing.assert_close(w, v, rtol=0, atol=0, msg=k)
    run = load_run(tmp_path / "pruned", split="test")
    assert run.model.num_surfels == len(keep)
    assert (torch.sigmoid(run.model.opacity_logit) >= t).all()

    assert _train(tmp_path / "all", data_root, [*base, "model.densify.final_prune_opacity=0.99"]) == 0
    assert torch.load(tmp_path / "all" / "checkpoints" / "last.pt",
                      weights_only=True)["model_info"]["num_surfels"] == 13776


def test_scale_growth_term_joins_the_full_models_regularisers(zju377, data_root):
    """With loss.lambda_scale_growth = w the full model's regularisers grow by exactly
    w x scale_growth_loss(s', template scales) for the same posed surfels; 0 adds nothing."""
    from fmgs.config import load_config
    from fmgs.trainer.engine.run import MODELS, build_setup, open_sequence
    from fmgs.trainer.losses.terms import scale_growth_loss

    os.environ["FMGS_DATA"] = str(data_root)
    base = [*TINY, "model.kind=full", "surfels.subdivisions=0",
            "model.full.semantic_field=false", "model.full.skinning_field=false"]
    cfg0 = load_config(None, [*base, "loss.lambda_scale_growth=0"])
    cfg1 = load_config(None, [*base, "loss.lambda_scale_growth=0.5"])
    seq = open_sequence(cfg0, "train")
    setup = build_setup(cfg0, seq)
    torch.manual_seed(0)
    model = MODELS["full"].from_config(cfg0, setup, num_frames=len(seq))
    with torch.no_grad():   # grow some surfels so that the term is not zero
        model.log_scale_delta[:100] = 0.7
    fr = seq[0]
    with torch.no_grad():
        posed = model.pose(fr, setup, frame_id=None, training=False)
        out = model.render(posed, fr.camera, cfg0)
        g0 = model.loss_groups(cfg0, out, posed, fr, None, 0, generator=torch.Generator().manual_seed(1))
        g1 = model.loss_groups(cfg1, out, posed, fr, None, 0, generator=torch.Generator().manual_seed(1))
    term = float(scale_growth_loss(posed.scales, model.scales0))
    assert term > 1e-3
    r0 = float(g0.get("regularisers", torch.tensor(0.0)))
    assert abs(float(g1["regularisers"]) - r0 - 0.5 * term) < 1e-6 * max(1.0, r0)
    assert set(g0) | {"regularisers"} == set(g1)
