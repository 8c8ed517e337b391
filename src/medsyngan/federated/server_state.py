"""The aggregator's state after each round, and its checkpoint: what a killed federation resumes from.

A round's checkpoint is written in the training checkpoint format, so that `generate` and `evaluate` read it as
they read a centralized run; the server optimizer's moments and the previous mean update ride in the
training-state file, the client-level DP noise seed in the sealed secret file (never in plaintext).

A growing model (ProGAN) has its schedule here: ``schedule_images`` is the public count that sets the stage and
fade-in of the next round (:mod:`medsyngan.training.schedule`), and the global networks' stage buffers hold the stage
that count gives, so that the checkpoint and the sample grids are at the resolution the federation has reached.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from medsyngan.config import Config
from medsyngan.errors import UserError
from medsyngan.models.progan import is_stage_key
from medsyngan.rundir import RunDir
from medsyngan.training.checkpoint import load_checkpoint, run_secret_key, save_checkpoint_files
from medsyngan.training.pretrained import pretrained_state
from medsyngan.training.schedule import GrowthSchedule
from medsyngan.training.step import GANTrainer


@dataclass
class ServerState:
    """Everything the aggregator needs to continue after a crash."""

    round: int
    global_state: dict[str, torch.Tensor]
    ema_state: dict[str, torch.Tensor] | None
    optimizer_state: dict[str, torch.Tensor] = field(default_factory=dict)
    last_round: dict[int, int] = field(default_factory=dict)  # hospital → last round whose update was aggregated
    images_seen: int = 0
    client_dp: dict[str, Any] | None = None  # DP-FedAvg accountant state and the server's secret noise seed
    previous_mean: dict[str, torch.Tensor] | None = None  # last round's mean update: sets SecAgg's shared scales
    schedule_images: int = 0  # growing models: the public count of the growth schedule at the next round's start

    @classmethod
    def initial(cls, cfg: Config) -> "ServerState":
        """Global networks initialised exactly as a centralized run with the same seed would be."""
        trainer = GANTrainer(cfg, device="cpu")
        if cfg.train.init_from:
            trainer.load_model_state(pretrained_state(cfg))
        state = trainer.model_state(("G", "D"))
        ema = {k.replace("G.", "G_ema.", 1): v.clone() for k, v in state.items() if k.startswith("G.")}
        return cls(round=0, global_state=state, ema_state=ema if cfg.train.ema_kimg > 0 else None)

    def generator_state(self) -> dict[str, torch.Tensor]:
        """The generator to sample from: the EMA when kept, else the global G, with ``G.`` keys."""
        if self.ema_state is not None:
            return {k.replace("G_ema.", "G.", 1): v for k, v in self.ema_state.items()}
        return {k: v for k, v in self.global_state.items() if k.startswith("G.")}

    def stage(self, cfg: Config) -> tuple[int, float] | None:
        """The global networks' (stage resolution, fade-in alpha); None for a model that does not grow. Read from
        the schedule at ``schedule_images``, not from the networks' float32 stage buffers: it is then exactly what
        every hospital's own schedule gives for that count."""
        schedule = GrowthSchedule.of(cfg)
        return None if schedule is None else schedule.stage(self.schedule_images)

    def advance_growth(self, cfg: Config) -> None:
        """After a round: move the schedule on by the round's local steps and set every network's stage to it."""
        schedule = GrowthSchedule.of(cfg)
        if schedule is None:
            return
        self.schedule_images = schedule.advance(self.schedule_images, cfg.federated.local_steps)
        resolution, alpha = schedule.stage(self.schedule_images)
        for state in (self.global_state, self.ema_state or {}):
            for key in [k for k in state if is_stage_key(k)]:
                value = resolution if key.endswith("stage_res") else alpha
                state[key] = torch.tensor(value, dtype=state[key].dtype)

    def update_ema(self, images: int, ema_kimg: float) -> None:
        """Move the EMA generator towards the global one; half-life in images, as in centralized training,
        measured over all hospitals' images this round."""
        if self.ema_state is None or images == 0:
            return
        beta = 0.5 ** (images / max(ema_kimg * 1000.0, 1e-8))
        for key, ema in self.ema_state.items():
            current = self.global_state[key.replace("G_ema.", "G.", 1)]
            ema.copy_(torch.lerp(current.to(ema.dtype), ema, beta) if ema.is_floating_point() else current)


def round_name(round_: int) -> str:
    return f"round-{round_:05d}"


def save_server_state(run_dir: RunDir, state: ServerState, cfg: Config, key: bytes | None = None) -> Path:
    """The round's checkpoint folder, sealed with ``key`` when one is given."""
    tensors = dict(state.global_state)
    if state.ema_state is not None:
        tensors.update(state.ema_state)
    meta = {
        "arch": cfg.model.arch,
        "resolution": cfg.model.resolution,
        "z_dim": cfg.model.z_dim,
        "parts": sorted({k.split(".", 1)[0] for k in tensors}),
        "config_toml": cfg.to_toml(),
        "round": state.round,
        "images_seen": state.images_seen,
        "kimg": state.images_seen / 1000,
        "last_round": {str(k): v for k, v in state.last_round.items()},
        "schedule_images": state.schedule_images,
    }
    if (stage := state.stage(cfg)) is not None:
        meta["stage_resolution"], meta["alpha"] = stage
    if state.client_dp is not None:
        meta["client_dp_accountant"] = state.client_dp["accountant"]
    private = {"server_optimizer": state.optimizer_state, "previous_mean": state.previous_mean}
    # Beside the accountant, client-level DP keeps its noise seed: secret (predictable noise protects nothing), so
    # sealed, with the run's own key if need be.
    secret = None
    if state.client_dp is not None:
        secret = {"client_dp": {k: v for k, v in state.client_dp.items() if k != "accountant"}}
    return save_checkpoint_files(run_dir.checkpoints, round_name(state.round), tensors, meta, private, keep=0,
                                 key=key, secret=secret,
                                 secret_key=run_secret_key(run_dir.root, key) if secret is not None else None)


def load_server_state(run_dir: RunDir, key: bytes | None = None) -> ServerState:
    if not (run_dir.checkpoints / "latest").is_file():
        raise UserError(f"{run_dir.root}: no federated checkpoint to resume from; start without --resume")
    ckpt = load_checkpoint(run_dir.root, key)
    if "round" not in ckpt.meta:
        raise UserError(f"{ckpt.path} is a centralized checkpoint; resume it without federated.enabled")
    ema = {k: v for k, v in ckpt.tensors.items() if k.startswith("G_ema.")}
    private = ckpt.training_state()
    client_dp = None
    if "client_dp_accountant" in ckpt.meta:
        client_dp = {"accountant": ckpt.meta["client_dp_accountant"], **ckpt.secret()["client_dp"]}
    return ServerState(
        round=int(ckpt.meta["round"]),
        global_state={k: v for k, v in ckpt.tensors.items() if not k.startswith("G_ema.")},
        ema_state=ema or None,
        optimizer_state=private["server_optimizer"],
        last_round={int(k): int(v) for k, v in ckpt.meta["last_round"].items()},
        images_seen=int(ckpt.meta["images_seen"]),
        client_dp=client_dp,
        previous_mean=private.get("previous_mean"),
        schedule_images=int(ckpt.meta.get("schedule_images", 0)),
    )
