"""Centralized training: the baseline every federated and private run is compared with.

Stopping: Ctrl-C or SIGTERM asks the loop to stop after the step in progress, then a checkpoint is written and
the run ends (a second Ctrl-C aborts at once). Stopping between steps, never inside one, is what lets
``--resume`` reproduce the uninterrupted run exactly.

DP runs: the DP session's state is split in two. Its public part (accountant history, σ, q, the plan) goes to
the checkpoint's ``meta.json``, so ε can be read from any checkpoint; the rest — the secret seed of the sampling
and noise streams and the sampler's position, from which anyone could rebuild which patients were drawn and the
noise added to D — goes only to the sealed ``secret.bin``, under ``privacy.checkpoint_key`` or the run's own key
file (:func:`~medsyngan.training.checkpoint.run_secret_key` says why the run makes one rather than refusing).
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from medsyngan.config import Config
from medsyngan.errors import UserError
from medsyngan.rundir import RunDir, log, progress
from medsyngan.runtime import configure_threads, seed_everything
from medsyngan.training.checkpoint import (
    checkpoint_key,
    load_checkpoint,
    restore_trainer,
    run_secret_key,
    save_trainer_checkpoint,
)
from medsyngan.training.generate import fixed_latents, save_sample_grid
from medsyngan.training.pretrained import pretrained_state
from medsyngan.training.schedule import check_run_length
from medsyngan.training.step import GANTrainer

# The parts of a DP session's state that may be read without a key; everything else (the seed of the secret
# streams, the sampler's position, and whatever the session keeps beside them) is sealed.
DP_PUBLIC_STATE = ("version", "accountant", "target_epsilon", "max_grad_norm", "guaranteed_steps", "planned_steps",
                   "mean_image", "labels")


def split_dp_state(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(public, secret) parts of a ``DPSession.state_dict()``; ``{**public, **secret}`` is the whole state."""
    public = {k: v for k, v in state.items() if k in DP_PUBLIC_STATE}
    return public, {k: v for k, v in state.items() if k not in DP_PUBLIC_STATE}


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag checked between steps; a second SIGINT raises KeyboardInterrupt."""

    def __init__(self) -> None:
        self.requested = False

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("stop requested: finishing this step and writing a checkpoint (Ctrl-C again to abort)")

    @contextmanager
    def installed(self) -> Iterator["StopRequest"]:
        if threading.current_thread() is not threading.main_thread():
            yield self  # signals can only be handled on the main thread; the caller's own handling applies
            return
        previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _check_data(cfg: Config, images: np.ndarray, source: str) -> None:
    if images.ndim != 3 or images.shape[1] != images.shape[2]:
        raise UserError(f"{source}: expected square greyscale images [N, S, S], got shape {tuple(images.shape)}")
    if images.shape[1] != cfg.model.resolution:
        raise UserError(
            f"{source} holds {images.shape[1]}-px images but model.resolution is {cfg.model.resolution}; "
            f"prepare the data at {cfg.model.resolution} px or set model.resolution={images.shape[1]} "
            f"data.size={images.shape[1]}"
        )


def train_centralized(cfg: Config, run_dir: RunDir, resume: bool = False) -> dict[str, Any]:
    """Train on one machine until ``cfg.train.steps`` generator steps; returns a summary of the run."""
    from medsyngan.data.api import load_training_data
    from medsyngan.data.labels import describe_source, plain_label_source, training_labels
    from medsyngan.data.loader import BatchLoader
    from medsyngan.models.registry import check_model_section

    configure_threads(cfg.run.threads)
    seed_everything(cfg.run.seed)
    t = cfg.train
    check_model_section(cfg.model)  # before any data is built for a model that cannot exist
    check_run_length(cfg)
    if cfg.privacy.clip_only:
        from medsyngan.federated.policy import check_clip_only

        check_clip_only(cfg.hospital, cfg.privacy)  # the data holder's own policy, as a federated hospital's
    key = checkpoint_key(cfg)  # a missing key file fails here, not at the first checkpoint
    ckpt = load_checkpoint(run_dir.checkpoints, key) if resume else None
    if ckpt is not None:
        ckpt.check_matches(cfg)
    # Read before the run's key file could be made: a resumed run whose key is lost stops here.
    dp_state = {**ckpt.meta["dp"], **ckpt.secret()["dp"]} if ckpt is not None and "dp" in ckpt.meta else None
    secret_key = run_secret_key(run_dir.root, key) if cfg.privacy.dp else None

    data = load_training_data(cfg)
    _check_data(cfg, data.images, cfg.data.path or cfg.data.source)
    labels = training_labels(cfg, data)
    trainer = GANTrainer(cfg)
    if ckpt is None and t.init_from:
        trainer.load_model_state(pretrained_state(cfg))
    loader = BatchLoader(data.images, t.batch_size, cfg.run.seed, device=trainer.device, augment=cfg.data.augment,
                         labels=labels)
    latents = fixed_latents(trainer.G.z_dim, cfg.run.seed)

    if ckpt is not None:
        loader_state = restore_trainer(trainer, ckpt)
        if loader_state is not None:
            loader.load_state_dict(loader_state)
        run_dir.truncate_metrics_after("step", trainer.step)
        log.info("resumed from %s (step %d, %.1f kimg)", ckpt.path, trainer.step, trainer.kimg)
    # DP-SGD: private D updates on Poisson patient batches, ε in metrics and checkpoints; the accountant state
    # comes back from the checkpoint, never reset.
    dp = None
    if cfg.privacy.dp:
        from medsyngan.privacy.accounting import planned_private_steps
        from medsyngan.privacy.dp import enable_dp

        dp = enable_dp(trainer, data.images, data.patients, cfg.privacy, batch_size=t.batch_size,
                       planned_steps=planned_private_steps(cfg), augment=cfg.data.augment, state=dp_state,
                       labels=labels)
        if cfg.privacy.clip_only:
            log.warning("privacy.clip_only: DP-SGD's sampling and clipping without noise (σ = 0): NO privacy, ε = ∞")
    elif trainer.conditional:
        trainer.set_label_source(plain_label_source(cfg, labels))
    if trainer.conditional:
        log.info("generated labels: %s", describe_source(t.label_source, t.label_table, cfg.privacy.dp,
                                                           cfg.privacy.label_noise))
    next_real = dp.next_real if dp is not None else loader.__next__
    log.info(
        "training %s at %d px on %s in %s: %d images, batch %d, %d steps",
        cfg.model.arch, cfg.model.resolution, trainer.device,
        "bf16 autocast" if trainer.autocast_dtype is not None else "float32", len(data.images), t.batch_size, t.steps,
    )

    def checkpoint() -> Path:
        meta = {"labels": trainer.label_source.to_json()} if trainer.label_source is not None else {}
        if dp is None:
            return save_trainer_checkpoint(run_dir.checkpoints, trainer, cfg, loader.state_dict(), extra_meta=meta,
                                           key=key)
        public, secret = split_dp_state(dp.state_dict())
        return save_trainer_checkpoint(run_dir.checkpoints, trainer, cfg, loader.state_dict(),
                                       extra_meta={**meta, "dp": public}, key=key, secret={"dp": secret},
                                       secret_key=secret_key)

    stop = StopRequest()
    last_time, last_images = time.perf_counter(), trainer.images_seen
    stats: dict[str, float] = {}
    start_step = trainer.step
    with stop.installed(), progress() as bar:
        task = bar.add_task("train", total=t.steps, completed=trainer.step)
        while trainer.step < t.steps and not stop.requested:
            stats = trainer.train_step(next_real)
            step = trainer.step
            bar.update(task, completed=step)
            if step % t.log_every == 0 or step == t.steps:
                now = time.perf_counter()
                img_per_s = (trainer.images_seen - last_images) / max(now - last_time, 1e-9)
                last_time, last_images = now, trainer.images_seen
                row = {"step": step, "kimg": round(trainer.kimg, 4), **stats, "img_per_s": round(img_per_s, 2)}
                if trainer.stage is not None:
                    row["stage_resolution"], row["alpha"] = trainer.stage
                if dp is not None:
                    row.update(dp.metrics())  # epsilon (replace-one), epsilon_add_remove
                run_dir.append_metrics(row)
            if step % t.sample_every == 0 or step == t.steps:
                save_sample_grid(trainer, latents, run_dir.samples / f"step-{step:06d}.png")
            if step % t.checkpoint_every == 0 or step == t.steps:
                checkpoint()
    interrupted = trainer.step < t.steps
    if interrupted and trainer.step > start_step and trainer.step % t.checkpoint_every != 0:
        path = checkpoint()
        log.warning("stopped at step %d; checkpoint %s; continue with --resume", trainer.step, path)
    return {"step": trainer.step, "kimg": trainer.kimg, "interrupted": interrupted, **stats}
