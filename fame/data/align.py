"""Face alignment onto the 112x112 ArcFace template (insightface ``norm_crop``).

Five landmarks, in insightface's order (left eye, right eye, nose tip, left and right mouth
corners, "left" meaning the image's left), are mapped onto ``face_align.arcface_dst`` by a
similarity transform. Landmarks come from insightface's model-zoo detector when its ONNX files
are on disk, or from a landmarks file:

- CSV: rows ``path,x1,y1,x2,y2,x3,y3,x4,y4,x5,y5`` (an optional header row is recognised by
  non-numeric coordinates), ``path`` relative to the input folder;
- JSON: an object mapping each relative path to 10 numbers or to five ``[x, y]`` pairs.
"""

from __future__ import annotations

import csv
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from fame.data.images import IMAGE_EXTENSIONS, CorruptSampleError, read_image, to_uint8_array

DEFAULT_PACK = "buffalo_l"


def align_face(image: np.ndarray, landmarks: Any, image_size: int = 112) -> np.ndarray:
    """Warp ``image`` (H, W, C) so its five ``landmarks`` (5, 2) land on the ArcFace template.

    Returns the ``image_size`` x ``image_size`` crop (same dtype and channel order as the input),
    computed by ``insightface.utils.face_align.norm_crop``. ``image_size`` must be a multiple
    of 112 (template scaled) or of 128 (template scaled and shifted right), as in insightface.
    """
    from insightface.utils.face_align import norm_crop

    points = np.asarray(landmarks, dtype=np.float32)
    if points.shape != (5, 2):
        raise ValueError(
            f"expected five (x, y) landmarks of shape (5, 2) (left eye, right eye, nose, left and right "
            f"mouth corner), got shape {points.shape}."
        )
    if not np.isfinite(points).all():
        raise ValueError(f"landmarks must be finite numbers, got {points.tolist()}.")
    if image_size <= 0 or (image_size % 112 and image_size % 128):
        raise ValueError(f"image_size must be a multiple of 112 or 128, got {image_size}.")
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"expected an image of shape (H, W, C), got shape {image.shape}.")
    with warnings.catch_warnings():
        # insightface 2.1 calls scikit-image's deprecated SimilarityTransform.estimate once per face.
        warnings.filterwarnings("ignore", message="`estimate` is deprecated", category=FutureWarning)
        return norm_crop(image, points, image_size=image_size)


def _landmark_points(values: Any, where: str) -> np.ndarray:
    try:
        points = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: landmarks must be 10 numbers (x1 y1 ... x5 y5), got {values!r}.") from None
    if points.size != 10:
        raise ValueError(
            f"{where}: expected 10 numbers (x1 y1 ... x5 y5) or five [x, y] pairs, got {points.size} numbers."
        )
    return points.reshape(5, 2)


def read_landmarks(path: str | Path) -> dict[str, np.ndarray]:
    """Read a landmarks file (CSV or JSON, see the module docstring) -> relative path -> (5, 2)."""
    path = Path(path)
    landmarks: dict[str, np.ndarray] = {}
    if path.suffix.lower() == ".json":
        try:
            content = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error}).") from error
        if not isinstance(content, dict):
            raise ValueError(f"{path}: expected a JSON object mapping image paths to 10 landmark numbers.")
        for name, values in content.items():
            landmarks[Path(name).as_posix()] = _landmark_points(values, f"{path}, entry {name!r}")
        return landmarks
    with open(path, newline="", encoding="utf-8") as handle:
        for row_number, row in enumerate(csv.reader(handle), start=1):
            if not row or not any(cell.strip() for cell in row):
                continue
            where = f"{path}, row {row_number}"
            if len(row) != 11:
                raise ValueError(f"{where}: expected 11 columns 'path,x1,y1,...,x5,y5', got {len(row)}.")
            try:
                numbers = [float(cell) for cell in row[1:]]
            except ValueError:
                if row_number == 1 and not landmarks:
                    continue
                raise ValueError(f"{where}: landmark coordinates must be numbers, got {row[1:]}.") from None
            name = Path(row[0].strip()).as_posix()
            if name in landmarks:
                raise ValueError(f"{where}: image {name} is listed twice.")
            landmarks[name] = _landmark_points(numbers, where)
    return landmarks


def default_model_root(pack: str = DEFAULT_PACK) -> Path:
    """Where insightface keeps a model pack: ``~/.insightface/models/<pack>``."""
    return Path("~/.insightface/models").expanduser() / pack


class FaceDetector:
    """insightface's model-zoo detector (SCRFD / RetinaFace) loaded from ONNX files on disk."""

    def __init__(self, model_root: str | Path, det_size: int = 640, det_thresh: float = 0.5, ctx_id: int = 0) -> None:
        model_root = Path(model_root).expanduser()
        if not model_root.is_dir() or not any(model_root.glob("*.onnx")):
            raise FileNotFoundError(
                f"No insightface detector found in {model_root}: expected the model pack's ONNX files there, "
                f"e.g. det_10g.onnx of '{DEFAULT_PACK}' at {default_model_root()}/det_10g.onnx. Download the pack "
                "(buffalo_l.zip from the insightface model zoo, "
                "https://github.com/deepinsight/insightface/tree/master/model_zoo), "
                "unpack its .onnx files into that folder or pass model_root=<folder>, or give a landmarks file "
                "(--landmarks) to align without a detector. Nothing is downloaded automatically."
            )
        from insightface.app import FaceAnalysis

        try:
            self.analysis = FaceAnalysis(name=str(model_root), allowed_modules=["detection"])
        except AssertionError:
            raise FileNotFoundError(
                f"{model_root}: none of its ONNX files is a face detector; add the pack's detector "
                "(e.g. det_10g.onnx from buffalo_l)."
            ) from None
        self.analysis.prepare(ctx_id=ctx_id, det_thresh=det_thresh, det_size=(det_size, det_size))

    def landmarks(self, image_rgb: np.ndarray) -> np.ndarray | None:
        """Five landmarks (5, 2) of the main face (largest, nearest the centre), or None."""
        faces = self.analysis.get(np.ascontiguousarray(image_rgb[:, :, ::-1]), max_num=1)
        if not faces or faces[0].kps is None:
            return None
        return np.asarray(faces[0].kps, dtype=np.float32)


@dataclass
class AlignmentSummary:
    """Relative paths of the aligned images, of images without a face, and of unreadable ones."""

    aligned: list[str] = field(default_factory=list)
    no_face: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)


def _list_images(root: Path) -> list[str]:
    names = []
    for directory, _, files in os.walk(root):
        for name in files:
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                names.append(Path(directory, name).relative_to(root).as_posix())
    return sorted(names)


def _save(crop: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    options = {"quality": 95} if path.suffix.lower() in (".jpg", ".jpeg") else {}
    Image.fromarray(crop).save(path, **options)


def align_faces(
    input_dir: str | Path,
    output_dir: str | Path,
    model_root: str | Path | None = None,
    landmarks: str | Path | None = None,
    image_size: int = 112,
    pack: str = DEFAULT_PACK,
    det_size: int = 640,
    det_thresh: float = 0.5,
    ctx_id: int = 0,
    skip_corrupt: bool = False,
) -> AlignmentSummary:
    """Align the faces below ``input_dir`` into ``output_dir`` (same relative paths).

    With ``landmarks`` (a CSV/JSON file), the listed images are aligned with the given points and
    no detector is needed. Otherwise every image is run through insightface's detector loaded
    from ``model_root`` (default ``~/.insightface/models/<pack>``); a missing model raises an
    error saying which files to put where. Images without a detected face are listed in
    ``no_face``; unreadable images raise, or are listed in ``corrupt`` with ``skip_corrupt``.
    """
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if not input_dir.is_dir():
        raise FileNotFoundError(f"{input_dir}: input folder not found.")
    summary = AlignmentSummary()
    locate: Callable[[str, np.ndarray], np.ndarray | None]
    if landmarks is not None:
        given = read_landmarks(landmarks)
        names = list(given)
        missing = [name for name in names if not (input_dir / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{landmarks}: {len(missing)} listed images are not in {input_dir} (first: {missing[:3]})."
            )
        locate = lambda name, image: given[name]  # noqa: E731
    else:
        names = _list_images(input_dir)
        detector = FaceDetector(model_root or default_model_root(pack), det_size, det_thresh, ctx_id)
        locate = lambda name, image: detector.landmarks(image)  # noqa: E731
    for name in names:
        try:
            image = to_uint8_array(read_image(input_dir / name))
        except CorruptSampleError:
            if not skip_corrupt:
                raise
            summary.corrupt.append(name)
            continue
        points = locate(name, image)
        if points is None:
            summary.no_face.append(name)
            continue
        _save(align_face(image, points, image_size), output_dir / name)
        summary.aligned.append(name)
    return summary
