"""LightningModules and callbacks that orchestrate the framework-free explainers."""

from .classifier import ImageClassifier, build_classification_model

__all__ = ["ImageClassifier", "build_classification_model"]
