"""Server-side aggregation arithmetic, free of Flower so that it can be tested against hand computations.

Hospitals send updates Δ_k = local_k − global (for every tensor they share). The server forms the
sample-weighted mean Δ = Σ n_k Δ_k / Σ n_k (FedAvg, McMahan et al. 2017) and applies it with a server
optimizer: plain addition (FedAvg), heavy-ball momentum on Δ (FedAvgM, Hsu et al. 2019), or Adam on the
pseudo-gradient −Δ (FedAdam, Reddi et al. 2021).
FedProx changes only the hospitals' local objective; its server step is FedAvg's.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import torch

State = dict[str, torch.Tensor]


def accumulate(total: State, update: Mapping[str, torch.Tensor], weight: float) -> None:
    """total += weight · update per tensor, in float64 so the order of hospitals barely matters."""
    for key, value in update.items():
        term = value.to(torch.float64) * weight
        total[key] = total[key] + term if key in total else term


def mean_of(total: Mapping[str, torch.Tensor], weight: float) -> State:
    """Σ w_k u_k / Σ w_k: the FedAvg mean update."""
    if weight <= 0:
        raise ValueError("the weights of the updates must sum to a positive number")
    return {k: v / weight for k, v in total.items()}


def apply_mean_update(global_state: Mapping[str, torch.Tensor], mean_delta: Mapping[str, torch.Tensor]) -> State:
    """global + Δ, keeping each tensor's dtype (integer buffers such as BatchNorm's batch counter are rounded)."""
    out: State = {}
    for key, value in global_state.items():
        if key not in mean_delta:
            out[key] = value.clone()
            continue
        updated = value.to(torch.float64) + mean_delta[key]
        out[key] = updated.round().to(value.dtype) if not value.is_floating_point() else updated.to(value.dtype)
    return out


class FedAdam:
    """Server-side Adam on the pseudo-gradient g = −Δ (Reddi et al. 2021, Algorithm 2 with τ for stability).

    The moments are part of the server's checkpoint (`state_dict`) so that a resumed federation continues the
    same trajectory.
    """

    def __init__(self, lr: float, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3):
        self.lr, self.beta1, self.beta2, self.tau = lr, beta1, beta2, tau
        self.m: State = {}
        self.v: State = {}

    def step(self, global_state: Mapping[str, torch.Tensor], mean_delta: Mapping[str, torch.Tensor]) -> State:
        out: State = {}
        for key, value in global_state.items():
            if key not in mean_delta or not value.is_floating_point():
                out.update(apply_mean_update({key: value}, {k: mean_delta[k] for k in (key,) if k in mean_delta}))
                continue
            delta = mean_delta[key].to(torch.float64)
            m = self.m.get(key, torch.zeros_like(delta))
            v = self.v.get(key, torch.zeros_like(delta))
            m = self.beta1 * m + (1 - self.beta1) * delta
            v = self.beta2 * v + (1 - self.beta2) * delta * delta
            self.m[key], self.v[key] = m, v
            out[key] = (value.to(torch.float64) + self.lr * m / (v.sqrt() + self.tau)).to(value.dtype)
        return out

    def state_dict(self) -> State:
        return {**{f"m.{k}": v for k, v in self.m.items()}, **{f"v.{k}": v for k, v in self.v.items()}}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.m = {k[2:]: v.to(torch.float64) for k, v in state.items() if k.startswith("m.")}
        self.v = {k[2:]: v.to(torch.float64) for k, v in state.items() if k.startswith("v.")}


class FedAvgM:
    """Server momentum (Hsu et al. 2019): v ← βv + Δ, global ← global + η·v.

    Averaging K hospitals' updates that point the same way moves the global model about as far as one hospital
    moved, although K times the images went through the discriminators; η > 1 or β > 0 lets the server take
    the longer step. β = 0, η = 1 is FedAvg. The velocity is part of the server's checkpoint.
    """

    def __init__(self, lr: float, momentum: float):
        self.lr, self.momentum = lr, momentum
        self.velocity: State = {}

    def step(self, global_state: Mapping[str, torch.Tensor], mean_delta: Mapping[str, torch.Tensor]) -> State:
        stepped: State = {}
        for key, value in mean_delta.items():
            velocity = self.momentum * self.velocity.get(key, torch.zeros_like(value, dtype=torch.float64))
            self.velocity[key] = velocity + value.to(torch.float64)
            stepped[key] = self.lr * self.velocity[key]
        return apply_mean_update(global_state, stepped)

    def state_dict(self) -> State:
        return {f"velocity.{k}": v for k, v in self.velocity.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.velocity = {k[len("velocity."):]: v.to(torch.float64) for k, v in state.items()
                         if k.startswith("velocity.")}


# The server learning rate each strategy uses when the configuration leaves it at 0.
DEFAULT_SERVER_LR = {"fedadam": 1e-2, "fedavgm": 1.0}


class ServerOptimizer:
    """The configured server step: FedAvg/FedProx add the mean update, FedAvgM adds momentum, FedAdam adapts it.

    Momentum and Adam act on the trainable parameters named in ``parameters`` only (there is no default, so
    no caller can forget it). Buffers such as BatchNorm's running variance, and integer counters, take the plain
    mean update: an Adam step or an overshooting velocity can drive a variance negative, and the generator then
    samples NaN although training looked fine.
    """

    def __init__(self, strategy: str, parameters: Collection[str], server_lr: float = 0.0,
                 server_momentum: float = 0.9):
        self.strategy = strategy
        self.parameters = frozenset(parameters)
        lr = server_lr or DEFAULT_SERVER_LR.get(strategy, 1.0)
        self.inner: FedAdam | FedAvgM | None = None
        if strategy == "fedadam":
            self.inner = FedAdam(lr)
        elif strategy == "fedavgm":
            self.inner = FedAvgM(lr, server_momentum)

    def step(self, global_state: Mapping[str, torch.Tensor], mean_delta: Mapping[str, torch.Tensor]) -> State:
        if self.inner is None:
            return apply_mean_update(global_state, mean_delta)
        stepped = {k for k in mean_delta if k in self.parameters}
        plain = {k: v for k, v in global_state.items() if k not in stepped}
        out = apply_mean_update(plain, {k: v for k, v in mean_delta.items() if k not in stepped})
        out.update(self.inner.step({k: global_state[k] for k in stepped}, {k: mean_delta[k] for k in stepped}))
        return out

    def state_dict(self) -> State:
        return self.inner.state_dict() if self.inner is not None else {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if self.inner is not None:
            self.inner.load_state_dict(state)


def delta(local: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> State:
    """local − reference per shared tensor, as float32 for the wire (integer buffers included, as counts)."""
    return {k: (local[k].to(torch.float64) - reference[k].to(torch.float64)).to(torch.float32) for k in reference}
