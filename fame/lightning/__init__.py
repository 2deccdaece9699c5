"""LightningModules and callbacks that orchestrate the framework-free explainers."""

from .classifier import ImageClassifier
from .explain import (
    EmptyMapWarning,
    ExplainMethod,
    ExplainModule,
    ExplainProgressBar,
    Indexed,
    MapWriter,
    MissingRows,
)
from .face import FaceRecognizer, load_face_recognizer
from .monitor import ExplanationMonitor
from .score import ScoreModule, ScoreWriter

__all__ = [
    "ImageClassifier",
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
