"""The composition root: what a run *is*, above every layer it composes (data, models, training, privacy,
federated, metrics, report). The CLI, the demo, the Flower apps and the studies call these functions; nothing
below imports from here."""

from medsyngan.workflows.runner import train

__all__ = ["train"]
