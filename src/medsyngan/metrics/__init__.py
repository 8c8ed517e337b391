"""Evaluation of synthetic images: distribution metrics, pixel metrics, PPL and a privacy audit.

Public entry points: :func:`evaluate` (an :class:`Evaluation` with everything the report shows) and
:func:`evaluate_images` (just the ``{metric: value}`` dict). The metrics are registered by name in
:mod:`medsyngan.metrics.registry`, each a function of a :class:`MetricContext` returning a :class:`MetricResult`.
"""

from medsyngan.metrics.context import MetricContext, MetricResult
from medsyngan.metrics.evaluate import Evaluation, evaluate, evaluate_images
from medsyngan.metrics.registry import METRICS, parse_metrics, register_metric

__all__ = ["METRICS", "Evaluation", "MetricContext", "MetricResult", "evaluate", "evaluate_images", "parse_metrics",
           "register_metric"]
