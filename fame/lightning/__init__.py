"""LightningModules and callbacks that orchestrate the framework-free explainers."""

from .classifier import ImageClassifier, build_classification_model
from .face import FaceRecognizer, load_face_recognizer
from .explain import (
    EmptyMapWarning,
    ExplainMethod,
    ExplainModule,
    ExplainProgressBar,
    Indexed,
    MapWriter,
    MissingRows,
)
from .monitor import ExplanationMonitor
from .score import ScoreModule, ScoreWriter

__all__ = [
    "ImageClassifier",
    "build_classification_model",
    "FaceRecognizer",
    "load_face_recognizer",
    "EmptyMapWarning",
    "ExplainMethod",
    "ExplainModule",
    "ExplainProgressBar",
    "Indexed",
    "MapWriter",
    "MissingRows",
    "ExplanationMonitor",
    "ScoreModule",
    "ScoreWriter",
]
