"""Evaluation of synthetic images: distribution metrics, pixel metrics, PPL and a privacy audit.

Public entry points: :func:`evaluate` (an :class:`Evaluation` with everything the report shows) and
:func:`evaluate_images` (just the ``{metric: value}`` dict).
"""

from medsyngan.metrics.evaluate import Evaluation, evaluate, evaluate_images, parse_metrics

__all__ = ["Evaluation", "evaluate", "evaluate_images", "parse_metrics"]
