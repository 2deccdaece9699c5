"""The stages behind train.py, explain.py and evaluate.py, each a function of a composed config.

config -> data -> model -> explainer -> map store -> metrics -> report. The entry points, the
tests and the notebooks call these same functions.
"""

from .evaluate import evaluate
from .explain import explain
from .train import train

__all__ = ["evaluate", "explain", "train"]
