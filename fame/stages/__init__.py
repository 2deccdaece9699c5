"""The stages behind train.py, explain.py (and its feature-map experiment) and evaluate.py, each a
function of a composed config; none imports another (what they share is in :mod:`fame.pipeline`).

config -> data -> model -> explainer -> map store -> metrics -> report. The entry points, the
tests and the notebooks call these same functions.
"""

from .evaluate import evaluate
from .explain import explain
from .featuremap import featuremap
from .train import train

__all__ = ["evaluate", "explain", "featuremap", "train"]
