"""Exported face backbones load back through build_face_model (strictly) and onnxruntime."""

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from fame.models import build_face_model
from fame.models.export import export_onnx, export_state_dict
from fame.models.onnx import has_baked_normalization

NETWORK = {"input_size": 32, "widths": (8, 16, 16, 32), "embedding_size": 24}


def trained_looking(embedder):
    """Random weights and BatchNorm statistics, so a wrong key or normalization shows in the output."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in embedder.net.state_dict().items():
            if tensor.is_floating_point() and not name.endswith("features.weight"):
                tensor.copy_(
                    torch.rand(tensor.shape, generator=generator) * 0.5 + (0.5 if "running_var" in name else -0.2)
                )
    return embedder.eval()


def test_state_dict_round_trip_loads_strictly(tmp_path):
    embedder = trained_looking(build_face_model("small", **NETWORK))
    path = export_state_dict(embedder, tmp_path / "out" / "backbone.pth")
    content = torch.load(path, weights_only=True)
    assert set(content) == set(embedder.net.state_dict())
    reloaded = build_face_model("small", path, **NETWORK)
    images = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(images), embedder(images))
    with pytest.raises(Exception, match="embedding_size"):
        build_face_model("small", path, **{**NETWORK, "embedding_size": 16})


def onnxruntime_embeddings(path, pixels: np.ndarray) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: pixels.astype(np.float32)})[0]


def test_onnx_in_insightface_convention_matches_torch(tmp_path):
    embedder = trained_looking(build_face_model("small", **NETWORK))
    path = export_onnx(embedder, tmp_path / "backbone.onnx")
    assert not has_baked_normalization(onnx.load(str(path)).graph)
    images = torch.rand(3, 3, 32, 32)  # a batch of 3 through a graph traced with 1
    with torch.no_grad():
        expected = embedder(images)
    runtime = onnxruntime_embeddings(path, ((images - 0.5) / 0.5).numpy())
    np.testing.assert_allclose(runtime, expected.numpy(), atol=1e-4, rtol=1e-4)
    reloaded = build_face_model("onnx", path)
    assert reloaded.input_size == (32, 32) and reloaded.embedding_size == 24
    with torch.no_grad():
        torch.testing.assert_close(reloaded(images), expected, atol=1e-4, rtol=1e-4)


def test_onnx_bakes_a_bgr_per_channel_normalization(tmp_path):
    embedder = trained_looking(
        build_face_model("small", channel_order="BGR", mean=(0.3, 0.4, 0.5), std=(0.2, 0.25, 0.3), **NETWORK)
    )
    path = export_onnx(embedder, tmp_path / "backbone.onnx")
    assert has_baked_normalization(onnx.load(str(path)).graph)
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = embedder(images)
    runtime = onnxruntime_embeddings(path, images.numpy() * 255.0)  # raw RGB pixels
    np.testing.assert_allclose(runtime, expected.numpy(), atol=1e-4, rtol=1e-4)
    reloaded = build_face_model("onnx", path)  # detects the baked normalization, feeds RGB
    with torch.no_grad():
        torch.testing.assert_close(reloaded(images), expected, atol=1e-4, rtol=1e-4)


def test_export_leaves_the_embedder_as_it_was(tmp_path):
    embedder = build_face_model("small", **NETWORK).train()
    before = {key: value.clone() for key, value in embedder.state_dict().items()}
    export_onnx(embedder, tmp_path / "backbone.onnx")
    assert embedder.training
    for key, value in embedder.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


def test_export_errors_are_clear(tmp_path):
    embedder = build_face_model("small", **NETWORK)
    with pytest.raises(ValueError, match="takes 32x32 crops"):
        export_onnx(embedder, tmp_path / "x.onnx", image_size=64)
    with pytest.raises(TypeError, match="FaceEmbedder"):
        export_state_dict(torch.nn.Linear(2, 2), tmp_path / "x.pth")
    onnx_embedder = build_face_model("onnx", export_onnx(embedder, tmp_path / "x.onnx"))
    with pytest.raises(ValueError, match="export it with export_onnx"):
        export_state_dict(onnx_embedder, tmp_path / "x.pth")
