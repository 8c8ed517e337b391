"""Warm start: a fresh run's G and D weights taken from another run's checkpoint (``train.init_from``).

The typical source is a model trained on public data — the built-in phantoms — before a private run on a
hospital's images: what a network learned from public data costs no privacy budget, and DP-SGD then only has to
move it towards the private distribution instead of learning anatomy from noise-dominated gradients.
Only weights travel; optimizer state, counters and the EMA's history start fresh.
"""

from __future__ import annotations

from torch import Tensor

from medsyngan.config import Config
from medsyngan.errors import UserError
from medsyngan.training.checkpoint import checkpoint_key, load_checkpoint


def pretrained_state(cfg: Config) -> dict[str, Tensor]:
    """``G.``/``D.``-prefixed weights of ``cfg.train.init_from``, checked against ``cfg``'s networks."""
    # An encrypted source opens with this run's key or with the one its own run names.
    ckpt = load_checkpoint(cfg.train.init_from, checkpoint_key(cfg))
    ckpt.check_matches(cfg)
    source, wanted = ckpt.config().model.model_dump(), cfg.model.model_dump()
    mismatched = [f"model.{k} ({source.get(k)} there, {v} here)" for k, v in wanted.items() if source.get(k) != v]
    if mismatched:
        raise UserError(
            f"train.init_from={cfg.train.init_from} was trained with another model: {', '.join(mismatched)}; "
            "pretrain with the same [model] section or clear train.init_from"
        )
    return {k: v for k, v in ckpt.tensors.items() if k.startswith(("G.", "D."))}
