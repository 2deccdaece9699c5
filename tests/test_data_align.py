"""Face alignment onto the ArcFace template: landmarks route end to end, detector errors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from fame.data import align_face, align_faces
from fame.data.align import read_landmarks

REPO = Path(__file__).resolve().parents[1]

# insightface.utils.face_align.arcface_dst, the 112x112 ArcFace template.
TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]
)


def placed_landmarks(scale: float = 1.5, degrees: float = 15.0, shift=(40.0, 25.0)) -> np.ndarray:
    """The template moved by a known similarity transform into a larger image."""
    angle = np.deg2rad(degrees)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return TEMPLATE @ rotation.T * scale + np.asarray(shift)


def blob_image(points: np.ndarray, width: int = 240, height: int = 220, sigma: float = 3.0) -> np.ndarray:
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    intensity = sum(np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma**2)) for x, y in points)
    gray = np.clip(255 * intensity, 0, 255).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)


def blob_centres(crop: np.ndarray, radius: int = 7) -> np.ndarray:
    """Intensity-weighted centroid of the crop around each template point."""
    channel = crop[:, :, 0].astype(np.float64)
    centres = []
    for x, y in TEMPLATE:
        x0, y0 = int(round(x)) - radius, int(round(y)) - radius
        window = channel[y0 : y0 + 2 * radius + 1, x0 : x0 + 2 * radius + 1]
        ys, xs = np.mgrid[y0 : y0 + 2 * radius + 1, x0 : x0 + 2 * radius + 1]
        assert window.sum() > 255 * 5, "no blob near the template point"
        centres.append([(xs * window).sum() / window.sum(), (ys * window).sum() / window.sum()])
    return np.asarray(centres)


def test_landmarks_land_on_the_template():
    points = placed_landmarks()
    crop = align_face(blob_image(points), points)
    assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8
    np.testing.assert_allclose(blob_centres(crop), TEMPLATE, atol=0.35)


def test_wrong_landmarks_and_sizes_are_refused():
    image = blob_image(placed_landmarks())
    with pytest.raises(ValueError, match=r"expected five \(x, y\) landmarks of shape \(5, 2\).*got shape \(10,\)"):
        align_face(image, placed_landmarks().reshape(-1))
    with pytest.raises(ValueError, match=r"got shape \(4, 2\)"):
        align_face(image, placed_landmarks()[:4])
    with pytest.raises(ValueError, match="finite"):
        align_face(image, np.full((5, 2), np.nan))
    with pytest.raises(ValueError, match="multiple of 112 or 128"):
        align_face(image, placed_landmarks(), image_size=100)
    assert align_face(image, placed_landmarks(), image_size=224).shape == (224, 224, 3)


def write_input(tmp_path: Path) -> tuple[Path, np.ndarray]:
    points = placed_landmarks()
    (tmp_path / "in" / "alice").mkdir(parents=True)
    Image.fromarray(blob_image(points)).save(tmp_path / "in" / "alice" / "1.png")
    return tmp_path / "in", points


def test_align_faces_with_a_csv_landmarks_file(tmp_path):
    input_dir, points = write_input(tmp_path)
    numbers = ",".join(f"{value:.4f}" for value in points.reshape(-1))
    landmarks = tmp_path / "landmarks.csv"
    landmarks.write_text("path,x1,y1,x2,y2,x3,y3,x4,y4,x5,y5\n" + f"alice/1.png,{numbers}\n")
    summary = align_faces(input_dir, tmp_path / "out", landmarks=landmarks)
    assert summary.aligned == ["alice/1.png"] and not summary.no_face and not summary.corrupt
    crop = np.asarray(Image.open(tmp_path / "out" / "alice" / "1.png"))
    assert crop.shape == (112, 112, 3)
    np.testing.assert_allclose(blob_centres(crop), TEMPLATE, atol=0.35)


def test_align_faces_command_with_a_json_landmarks_file(tmp_path, capsys):
    input_dir, points = write_input(tmp_path)
    Image.open(input_dir / "alice" / "1.png").save(input_dir / "alice" / "2.jpg", quality=98)
    (input_dir / "broken.jpg").write_bytes(b"\xff\xd8\xff")
    landmarks = tmp_path / "landmarks.json"
    landmarks.write_text(json.dumps({"alice/2.jpg": points.tolist(), "broken.jpg": points.reshape(-1).tolist()}))
    spec = importlib.util.spec_from_file_location("align_faces_command", REPO / "align_faces.py")
    command = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(command)
    command.main([str(input_dir), str(tmp_path / "out"), "--landmarks", str(landmarks), "--skip-corrupt"])
    output = capsys.readouterr().out
    assert "aligned 1 images" in output and "skipped 1 unreadable: broken.jpg" in output
    crop = np.asarray(Image.open(tmp_path / "out" / "alice" / "2.jpg"))
    np.testing.assert_allclose(blob_centres(crop), TEMPLATE, atol=0.5)
    assert not (tmp_path / "out" / "broken.jpg").exists()


def test_landmark_file_errors(tmp_path):
    (tmp_path / "short.csv").write_text("a.png,1,2,3\n")
    with pytest.raises(ValueError, match=r"short.csv, row 1: expected 11 columns"):
        read_landmarks(tmp_path / "short.csv")
    (tmp_path / "text.csv").write_text("a.png," + ",".join(["1"] * 10) + "\nb.png,x" + ",1" * 9 + "\n")
    with pytest.raises(ValueError, match=r"text.csv, row 2: landmark coordinates must be numbers"):
        read_landmarks(tmp_path / "text.csv")
    (tmp_path / "points.json").write_text(json.dumps({"a.png": [[1, 2], [3, 4]]}))
    with pytest.raises(ValueError, match=r"points.json, entry 'a.png': expected 10 numbers"):
        read_landmarks(tmp_path / "points.json")
    (tmp_path / "in").mkdir()
    (tmp_path / "ok.csv").write_text("missing.png," + ",".join(["1"] * 10) + "\n")
    with pytest.raises(FileNotFoundError, match=r"ok.csv: 1 listed images are not in"):
        align_faces(tmp_path / "in", tmp_path / "out", landmarks=tmp_path / "ok.csv")


def test_missing_detector_models_give_instructions(tmp_path, monkeypatch):
    input_dir, _ = write_input(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    expected_root = tmp_path / "home" / ".insightface" / "models" / "buffalo_l"
    with pytest.raises(
        FileNotFoundError, match=rf"No insightface detector found in {expected_root}.*det_10g.onnx.*--landmarks"
    ):
        align_faces(input_dir, tmp_path / "out")
    (tmp_path / "models").mkdir()
    with pytest.raises(
        FileNotFoundError,
        match=rf"No insightface detector found in {tmp_path / 'models'}: expected the model pack's ONNX files",
    ):
        align_faces(input_dir, tmp_path / "out", model_root=tmp_path / "models")
    assert not (tmp_path / "out").exists()


def test_a_model_folder_without_a_detector_is_named(tmp_path):
    input_dir, _ = write_input(tmp_path)
    # A real ONNX file that insightface routes as a recognition model, not a detector.
    pixels = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, 112, 112])
    output = helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [1, 3, 112, 112])
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input.1"], ["embedding"])], "recognition", [pixels], [output]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    (tmp_path / "pack").mkdir()
    onnx.save(model, tmp_path / "pack" / "w600k_r50.onnx")
    with pytest.raises(FileNotFoundError, match=r"pack: none of its ONNX files is a face detector"):
        align_faces(input_dir, tmp_path / "out", model_root=tmp_path / "pack", ctx_id=-1)
