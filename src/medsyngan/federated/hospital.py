"""One hospital's side of a federation, free of Flower: its data, its persistent trainer, one round of local work.

FedGAN (Rasouli et al. 2020): in every round each hospital loads the global networks, trains G and D locally for
K generator steps with the same :class:`~medsyngan.training.step.GANTrainer` step as a centralized run, and returns
Δ = local − global for the shared networks. Its optimizer moments, data-loader position, RNG and (when D is kept
local) its discriminator persist across rounds through :meth:`Hospital.state_dict`, which the Flower client keeps
in ``context.state`` and on the hospital's own disk.

Its DP session is not part of that state: it lives in the hospital's ledger (:class:`Ledger`), which only grows. A
round charges its planned private steps to the ledger before the first of them runs and settles after the last,
so a hospital brought back to an older round's state keeps every step and release it ever paid for.

A conditional model's real batches carry the hospital's labels, and its generated labels come from the source the
federation's configuration (the server's plan) names: the public table every hospital reads, or the hospital's own
label frequencies — under DP released once by the hospital itself (kept in its DP ledger), otherwise used as they are.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from medsyngan.config import Config, HospitalSection
from medsyngan.data.labels import plain_label_source, training_labels
from medsyngan.data.loader import BatchLoader
from medsyngan.data.prepared import PreparedDataset
from medsyngan.errors import UserError
from medsyngan.federated.aggregation import delta
from medsyngan.federated.plan import derive_seed
from medsyngan.training.generate import generate_images
from medsyngan.training.step import GANTrainer

# Called with (generated uint8 [N,S,S], held-out uint8 [M,S,S]); returns scalar metrics. Injected by the app so
# that this module does not depend on the evaluation layer.
EvaluateFn = Callable[[np.ndarray, np.ndarray], Mapping[str, float]]


def shared_parts(cfg: Config) -> tuple[str, ...]:
    """The networks that leave the hospital: G always, D unless discriminators are kept local."""
    return ("G", "D") if cfg.federated.share_discriminator else ("G",)


def hospital_config(cfg: Config, hospital: int, policy: HospitalSection | None = None) -> Config:
    """The configuration a hospital trains with: its own seed stream, no local EMA (the server keeps one), and the
    privacy its policy allows (:func:`~medsyngan.federated.policy.effective_privacy`)."""
    from medsyngan.federated.policy import effective_privacy

    local = cfg.model_copy(deep=True)
    local.run.seed = derive_seed(cfg.run.seed, "hospital", hospital) % 2**31
    local.train.ema_kimg = 0.0
    if policy is not None:
        from medsyngan.federated.policy import PolicyRefusal, clip_only_refusals

        # Also refused here, not only in the instruction check: no path builds a clipping-only hospital whose
        # policy forbids it.
        if reasons := clip_only_refusals(policy, cfg.privacy):
            raise PolicyRefusal(f"hospital {hospital} refuses: " + "; ".join(reason for _, reason in reasons))
        local.privacy = effective_privacy(policy, cfg.privacy)
    return local


class Ledger(Protocol):
    """Where a hospital's DP session is kept: read once when the session is built, written at every charge."""

    name: str

    def read(self) -> dict | None: ...

    def write(self, state: dict) -> None: ...


@dataclass
class RoundResult:
    update: dict[str, Tensor]
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


class Hospital:
    """A hospital's trainer and data. ``train`` holds its training images, ``holdout`` its evaluation patients."""

    def __init__(
        self,
        cfg: Config,
        hospital_id: int,
        train: PreparedDataset,
        holdout: PreparedDataset | None = None,
        device: torch.device | str | None = None,
        policy: HospitalSection | None = None,
    ):
        self.cfg = cfg
        self.hospital_id = hospital_id
        self.train_set = train
        self.holdout = holdout
        self.policy = policy
        local = hospital_config(cfg, hospital_id, policy)
        self.trainer = GANTrainer(local, device=device)
        self.labels = training_labels(cfg, train, f"hospital {hospital_id}'s training set")
        self.loader = BatchLoader(
            train.images, cfg.train.batch_size, seed=local.run.seed, device=self.trainer.device,
            augment=cfg.data.augment, labels=self.labels,
        )
        if self.trainer.conditional and not cfg.privacy.dp:
            self.trainer.set_label_source(plain_label_source(cfg, self.labels))
        self.rounds_done = 0
        self.local_cfg = local
        self.dp = None
        self._dp_state: dict | None = None  # a DP session carried in state_dict(), when there is no ledger
        self.ledger: Ledger | None = None

    @property
    def num_examples(self) -> int:
        return len(self.train_set)

    @property
    def num_patients(self) -> int:
        return int(len(np.unique(self.train_set.patients)))

    def _batches(self):
        """Where real batches come from: the shuffled loader, or under DP the Poisson patient sampler (which also
        replaces the discriminator update). The DP session is built once, from the ledger (or the state) when
        there is one, so σ is calibrated only at the hospital's very first round and the accountant is never
        reset."""
        if not self.cfg.privacy.dp:
            return self.loader.__next__
        if self.dp is None:
            from medsyngan.privacy.accounting import planned_private_steps
            from medsyngan.privacy.dp import enable_dp

            local = self.local_cfg
            state = self.ledger.read() if self.ledger is not None else self._dp_state
            min_noise = self.policy.min_noise_multiplier if self.policy is not None else 0.0
            self.dp = enable_dp(self.trainer, np.asarray(self.train_set.images), self.train_set.patients,
                                local.privacy, batch_size=local.train.batch_size,
                                planned_steps=planned_private_steps(local), augment=local.data.augment,
                                state=state, min_noise=min_noise, labels=self.labels,
                                ledger=(self.ledger.write, self.ledger.name) if self.ledger is not None else None)
        return self.dp.next_real

    def check_ready(self) -> None:
        """Everything that can be refused before training starts: DP plan (sampling rate, δ, reachable ε) and a
        discriminator Opacus can make private. Raises UserError naming the problem."""
        self._batches()

    def train_round(self, global_state: Mapping[str, Tensor], steps: int,
                    growth: tuple[int, int, float] | None = None) -> RoundResult:
        """K local generator steps from the global networks; returns Δ of the shared networks and round metrics.

        ``growth`` (a growing model): the server's (image count, stage resolution, alpha) at the round's start; the
        hospital trains from that count, so that its stage and fade-in are every other hospital's."""
        next_real = self._batches()
        self.trainer.load_model_state(global_state)
        if growth is not None:
            self.trainer.set_images_seen(growth[0])
            if self.trainer.stage != tuple(growth[1:]):
                raise UserError(f"the server's stage ({growth[1]} px, alpha {growth[2]:g}) is not what this hospital's "
                                f"schedule gives for {growth[0]} images ({self.trainer.stage}); run the same "
                                "MedSynGAN version as the aggregator")
        reference = {k: v.detach().clone() for k, v in global_state.items()}
        if self.dp is not None:  # charged and written to the ledger before any private step runs
            self.dp.reserve(steps * self.cfg.train.d_steps_per_g)
        hooks = self._proximal_hooks(reference) if self.cfg.federated.strategy == "fedprox" else []
        start = time.perf_counter()
        sums: dict[str, float] = {}
        images_before = self.trainer.images_seen
        try:
            for _ in range(steps):
                for key, value in self.trainer.train_step(next_real).items():
                    sums[key] = sums.get(key, 0.0) + value
        finally:
            for hook in hooks:
                hook.remove()
            if self.dp is not None:
                self.dp.settle()
        seconds = time.perf_counter() - start
        local = {k: v for k, v in self.trainer.model_state(shared_parts(self.cfg)).items() if k in global_state}
        self.rounds_done += 1
        images = self.trainer.images_seen - images_before
        metrics = {f"{k}": v / steps for k, v in sums.items()}
        metrics.update(train_seconds=seconds, img_per_s=images / max(seconds, 1e-9), images=float(images))
        if self.trainer.stage is not None:
            metrics.update(stage_resolution=float(self.trainer.stage[0]), alpha=self.trainer.stage[1])
        if self.dp is not None:
            metrics.update(self.dp.metrics(), dp_steps=float(self.dp.steps), dp_releases=float(self.dp.releases),
                           noise_multiplier=self.dp.noise_multiplier,
                           sample_rate=self.dp.sample_rate, delta=self.dp.delta,
                           patient_level=float(self.dp.unit == "patient"))
        return RoundResult(update=delta(local, reference), num_examples=self.num_examples, metrics=metrics)

    def _proximal_hooks(self, reference: Mapping[str, Tensor]) -> list:
        """FedProx (Li et al. 2020): add μ(w − w_global) to each shared parameter's gradient before every step."""
        mu = self.cfg.federated.proximal_mu
        handles = []
        for part, optimizer in (("G", self.trainer.opt_g), ("D", self.trainer.opt_d)):
            if part not in shared_parts(self.cfg):
                continue
            net = self.trainer.networks()[part]
            pairs = [
                (param, reference[f"{part}.{name}"].to(param.device))
                for name, param in net.named_parameters()
                if f"{part}.{name}" in reference
            ]

            def pre_step(_opt, _args, _kwargs, pairs=pairs):
                for param, anchor in pairs:
                    if param.grad is not None:
                        param.grad.add_(param.detach() - anchor, alpha=mu)

            handles.append(optimizer.register_step_pre_hook(pre_step))
        return handles

    def evaluate(self, generator_state: Mapping[str, Tensor], count: int, evaluate_fn: EvaluateFn) -> dict[str, float]:
        """Metrics of the global generator against this hospital's held-out images; only scalars leave."""
        if self.holdout is None or len(self.holdout) == 0:
            return {}
        if self.trainer.conditional and self.trainer.label_source is None:
            self._batches()  # under DP the label source is the hospital's release, read back with its DP state
        self.trainer.load_model_state(generator_state, keep_stage=True)
        seed = derive_seed("evaluate", self.hospital_id) % 2**31
        labels = None
        if self.trainer.label_source is not None:
            labels = self.trainer.label_source.sample(count, torch.Generator().manual_seed(seed))
        fake = generate_images(self.trainer.G, count, seed=seed, labels=labels)
        result = dict(evaluate_fn(fake, np.asarray(self.holdout.images)))
        result["holdout_images"] = float(len(self.holdout))
        return result

    def state_dict(self) -> dict:
        """Trainer, loader and round counter; the DP session too when it has no ledger to live in."""
        dp = None
        if self.ledger is None:
            dp = self.dp.state_dict() if self.dp is not None else self._dp_state
        return {"trainer": self.trainer.state_dict(), "loader": self.loader.state_dict(), "rounds": self.rounds_done,
                "dp": dp}

    def load_state_dict(self, state: Mapping) -> None:
        self.trainer.load_state_dict(state["trainer"])
        self.loader.load_state_dict(state["loader"])
        self.rounds_done = int(state["rounds"])
        self._dp_state = state.get("dp")
        self.dp = None
