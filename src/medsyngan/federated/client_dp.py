"""Client-level differential privacy on the server: DP-FedAvg (McMahan et al. 2018)."""

from __future__ import annotations

import secrets
from collections.abc import Mapping

import numpy as np
import torch

from medsyngan.config import Config
from medsyngan.federated.server_state import ServerState
from medsyngan.privacy.accounting import PrivacyAccountant, client_level_accountant
from medsyngan.privacy.codec import add_client_dp_noise


class ClientLevelDP:
    """Updates arrive clipped to C by each hospital (so this works under secure aggregation too); the server adds
    N(0, σ²C²) to their sum and divides by the round's planned number of participants, fixed before anyone
    replies. Its accountant (unit = hospital, one step per round at q = 1: participants are drawn from the public
    run seed, so no amplification by sampling is claimed; replace-one, like every ε here) lives in the server
    checkpoint and only grows."""

    def __init__(self, cfg: Config, state: ServerState):
        self.privacy = cfg.privacy
        self.state = state
        if state.client_dp is None:
            accountant = client_level_accountant(cfg.privacy.client_noise, cfg.federated.hospitals, cfg.privacy.delta)
            state.client_dp = {"accountant": accountant.state_dict(), "seed": secrets.randbits(63)}
        self.accountant = PrivacyAccountant.from_state_dict(state.client_dp["accountant"])

    def noisy_mean(self, total_sum: Mapping[str, torch.Tensor], planned: int, round_: int) -> dict[str, torch.Tensor]:
        total = {k: v.to(torch.float64).numpy() for k, v in total_sum.items()}
        rng = np.random.default_rng([self.state.client_dp["seed"], round_])
        noisy = add_client_dp_noise(total, self.privacy.client_clip, self.privacy.client_noise, rng)
        self.accountant.step(1)
        self.state.client_dp["accountant"] = self.accountant.state_dict()
        return {k: torch.as_tensor(np.array(v, np.float64)) / planned for k, v in noisy.items()}

    def metrics(self) -> dict[str, float]:
        eps = self.accountant.epsilon()
        return {"client_epsilon": eps["reported"], "client_epsilon_add_remove": eps["add_remove"]}
