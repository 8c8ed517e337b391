"""The composition root: what a run *is*, above every layer it composes (data, models, training, privacy,
federated, metrics, report). The CLI, the demo, the Flower apps and the studies call these functions; nothing
below imports from here.

``train(cfg, run_dir, resume)`` trains one run, centralized or federated; ``evaluate_run(run_dir, real, train)``
scores a trained run; recipes (``workflows.recipes``) describe runs as data."""

from medsyngan.workflows.evaluation import evaluate_run
from medsyngan.workflows.runner import train

__all__ = ["evaluate_run", "train"]
