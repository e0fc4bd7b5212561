"""The training loop of ``fmgs-train``, the same for every avatar model.

Each iteration draws one training frame, poses the avatar (:meth:`AvatarModel.pose`),
renders it with the 2DGS rasteriser (:meth:`AvatarModel.render`), and back-propagates the
model's loss groups (:meth:`AvatarModel.loss_groups`, :meth:`AvatarModel.backward`:
eq. 13-14 for the foundation model, eq. 13-21 with coordinated training for the full
model). Progress is shown
with tqdm and logged to TensorBoard (``RUN_DIR/tb``); checkpoints are written
atomically every ``train.checkpoint_every`` iterations, at the end, and when the
run is interrupted (Ctrl-C), after which ``fmgs-train --resume RUN_DIR`` continues.
"""
from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from omegaconf import DictConfig

from fmgs.config import absolute_paths, save_config
from fmgs.trainer.engine.checkpoint import load_checkpoint, restore_rng, save_checkpoint
from fmgs.trainer.engine.metrics import psnr
from fmgs.trainer.models.densify import (
    DensifyStats, densify_iterations, densify_model, prune_candidates, replay_on_model, select_faces,
)
from fmgs.trainer.engine.run import (
    apply_lr_schedule, apply_threads, build_model, build_setup, check_backend, heldout_split, make_optimizer, open_sequence,
    quick_eval, resolve_device,
)


def semantic_iteration(cfg: DictConfig, iteration: int) -> bool:
    """Whether training iteration ``iteration`` (0-based) evaluates the semantic branch: every
    ``loss.semantic_every``-th one (1 = all). With ``train.semantic_weights_only`` the semantic
    losses reach nothing but the semantic field, so skipping them elsewhere leaves every other
    parameter's updates unchanged; only the semantic field is trained less often."""
    k = int(cfg.loss.semantic_every)
    return k <= 1 or iteration % k == 0


class _GracefulInterrupt:
    """Turn the first SIGINT/SIGTERM into a flag so the loop can checkpoint and exit cleanly."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        def handler(signum, _frame):
            if self.requested:  # second Ctrl-C: give up immediately
                raise KeyboardInterrupt
            self.requested = True
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, handler)
            except ValueError:  # not in the main thread
                pass
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


#: Signature of the optional initialisation hook of :func:`train`:
#: ``(cfg, model, setup, train_seq, heldout_seq, run_dir) -> seconds spent`` (counted as training
#: time); ``heldout_seq`` is the validation split when the config has one, else the test split.
InitHook = Callable[..., float]


def train(cfg: DictConfig, run_dir: Path, resume: bool = False, initialise: InitHook | None = None) -> Path:
    """Train (or resume) an avatar into ``run_dir``.

    Args:
        cfg: full run configuration (:class:`fmgs.config.Config`).
        run_dir: output folder (created).
        resume: continue from ``run_dir/checkpoints/last.pt``.
        initialise: called once before iteration 0 of a new run (e.g.
            :func:`fmgs.trainer.init.aggregate.apply_init`); not on resume.

    Returns:
        ``run_dir``.

    Raises:
        FmgsInputError: bad data or configuration (names the file).
    """
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    backend = check_backend(cfg)
    device = resolve_device(cfg)
    if not resume:
        absolute_paths(cfg)
    # The data is checked before the run folder is written: a bad split or path leaves nothing.
    train_seq = open_sequence(cfg, "train")
    split = heldout_split(cfg)
    test_seq = open_sequence(cfg, split)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    apply_threads(cfg)
    if not resume:
        print(f"data: {cfg.data.root}")
        save_config(cfg, run_dir / "config.yaml")
    torch.manual_seed(int(cfg.train.seed))
    np.random.seed(int(cfg.train.seed))

    setup = build_setup(cfg, train_seq)
    # on its device before the optimiser exists, so Adam's state is made there too
    model = build_model(cfg, setup, num_frames=len(train_seq))
    state = None
    if resume:
        # A densified run is rebuilt at its checkpointed surfel count before the optimiser exists.
        state = load_checkpoint(run_dir)          # read onto the CPU whatever device wrote it
        replay_on_model(model, (state.get("model_info") or {}).get("densify"))
    model = model.to(device)
    opt = make_optimizer(cfg, model)
    priors = [None] * len(train_seq)
    if model.needs_priors:
        from fmgs.priors import load_priors

        priors = load_priors(cfg.data.root, train_seq.names, int(cfg.data.image_size), cfg.data.priors_dir)

    start_it, elapsed = 0, 0.0
    dens_its = densify_iterations(cfg)
    stats = DensifyStats(model.num_surfels)
    if resume:
        model.load_state_dict(state["model"])      # copied into the parameters on `device`
        if "densify_stats" in (state.get("extra") or {}):
            stats.load_state_dict(state["extra"]["densify_stats"])
        opt.load_state_dict(state["optimizer"])    # torch moves Adam's moments to their parameters' device
        start_it, elapsed = int(state["iteration"]), float(state["elapsed_s"])
        restore_rng(state)
        print(f"resuming {run_dir} from iteration {start_it} ({elapsed / 60:.1f} min trained)")
    elif initialise is not None:
        elapsed = initialise(cfg, model, setup, train_seq, test_seq, run_dir)
    resumed_elapsed = elapsed if resume else 0.0   # the time spent before this session (0 on a fresh run)

    total = int(cfg.train.iterations)
    writer = SummaryWriter(str(run_dir / "tb"), purge_step=start_it if resume else None)
    tc = cfg.train
    progress_file = run_dir / "progress.jsonl"
    eval_every = int(tc.eval_every or 0)
    print(f"fmgs-train: {model.num_surfels} surfels, {len(train_seq)} training frames, "
          f"{total} iterations on {device} ({backend} rasteriser) -> {run_dir}")

    it = start_it
    with _GracefulInterrupt() as stop, tqdm(total=total, initial=start_it, desc="train", unit="it",
                                             dynamic_ncols=True, disable=None) as bar:
        t_last = time.perf_counter()
        budget_s = float(tc.max_minutes) * 60.0 if tc.max_minutes else float("inf")
        while it < total and not stop.requested:
            if elapsed >= budget_s:
                print(f"\ntime budget of {tc.max_minutes} min reached at iteration {it}")
                total = it
                break
            # The frame of iteration `it` depends only on (seed, it), so a resumed run
            # sees exactly the frames an uninterrupted one would.
            idx = int(np.random.default_rng([int(tc.seed), it]).integers(len(train_seq)))
            fr = train_seq[idx]
            opt.zero_grad(set_to_none=True)
            gen = torch.Generator().manual_seed(int(tc.seed) * 1_000_003 + it)
            posed = model.pose(fr, setup, frame_id=idx, training=True, semantic=semantic_iteration(cfg, it))
            densifying = any(d > it for d in dens_its)
            if densifying:
                stats.hook_means(posed.means, fr.camera)
            out = model.render(posed, fr.camera, cfg)
            groups = model.loss_groups(cfg, out, posed, fr, priors[idx], it, generator=gen)
            loss = sum(groups.values())
            model.backward(posed, groups, cfg)
            if densifying:
                stats.finish_iteration()
                stats.add_coverage(posed.means, out.alpha, torch.from_numpy(fr.mask), fr.camera,
                                   int(cfg.model.densify.coverage_radius))
            if tc.grad_clip and tc.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), float(tc.grad_clip))
            apply_lr_schedule(cfg, opt, it)
            opt.step()
            it += 1
            if it in dens_its:
                dc = cfg.model.densify
                ids = select_faces(stats, model.num_surfels, float(dc.fraction), float(dc.coverage_share),
                                   int(dc.max_surfels))
                rem = prune_candidates(model, float(dc.prune_opacity), exclude=ids)
                n0 = model.num_surfels
                densify_model(model, ids, opt, remove_ids=rem)
                stats.reset(model.num_surfels)
                writer.add_scalar("train/surfels", model.num_surfels, it)
                tqdm.write(f"densified at iteration {it}: {len(ids)} faces split, {len(rem)} pruned, "
                           f"{n0} -> {model.num_surfels} surfels")
            now = time.perf_counter()
            elapsed += now - t_last
            t_last = now
            bar.update(1)
            if it % int(tc.log_every) == 0 or it == total:
                with torch.no_grad():
                    p = psnr(out.rgb.detach().clamp(0, 1).cpu().numpy(), fr.image)
                bar.set_postfix(loss=f"{loss.item():.4f}", psnr=f"{p:.2f}")
                writer.add_scalar("loss/total", loss.item(), it)
                for name, val in groups.items():
                    writer.add_scalar(f"loss/{name}", float(val.detach()), it)
                writer.add_scalar("train/psnr", p, it)
                writer.add_scalar("train/seconds_per_iteration", elapsed / it, it)
            if int(tc.image_every) and it % int(tc.image_every) == 0:
                side = torch.cat([torch.from_numpy(fr.image), out.rgb.detach().clamp(0, 1).cpu()], dim=1)
                writer.add_image("train/gt_vs_render", side.permute(2, 0, 1), it)
            if eval_every and (it % eval_every == 0 or it == total):
                q = quick_eval(model, setup, test_seq, cfg, int(tc.eval_frames))
                writer.add_scalar(f"{split}/psnr", q["psnr"], it)
                q["split"] = split
                with open(progress_file, "a") as f:
                    f.write(json.dumps({"iteration": it, "elapsed_s": round(elapsed, 2), **q}) + "\n")
                t_last = time.perf_counter()  # do not count evaluation as training time
            if int(tc.checkpoint_every) and it % int(tc.checkpoint_every) == 0 and it < total:
                save_checkpoint(run_dir, model, opt, it, elapsed, extra={"densify_stats": stats.state_dict()})
                t_last = time.perf_counter()

    if it >= total:
        # End-of-training pruning (model.densify.final_prune_opacity): nearly transparent
        # surfels are dropped from the fixed buffer that eval, export and the runtime use.
        t_prune = float(cfg.model.densify.final_prune_opacity)
        rem = prune_candidates(model, t_prune)
        if len(rem) >= model.num_surfels:
            print(f"warning: every surfel has opacity < model.densify.final_prune_opacity={t_prune:g}; "
                  "none pruned (lower the threshold)", file=sys.stderr)
        elif len(rem):
            n0 = model.num_surfels
            densify_model(model, [], opt, remove_ids=rem)
            writer.add_scalar("train/surfels", model.num_surfels, it)
            print(f"pruned {len(rem)} surfels with opacity < {t_prune:g}: "
                  f"{n0} -> {model.num_surfels} surfels")
    save_checkpoint(run_dir, model, opt, it, elapsed, extra={"densify_stats": stats.state_dict()})
    writer.flush()
    writer.close()
    if it < total:
        print(f"\ninterrupted at iteration {it}/{total}; checkpoint saved to {run_dir}/checkpoints/last.pt\n"
              f"continue with:  fmgs-train --resume {run_dir}", file=sys.stderr)
        raise KeyboardInterrupt
    print(f"training done: {it} iterations in {elapsed / 60:.1f} min "
          f"({(elapsed - resumed_elapsed) / max(it - start_it, 1):.2f} s/it this session)")
    return run_dir
