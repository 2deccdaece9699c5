"""ONNX recognition models: our own IResNet exported to ONNX, converted back with gradients."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx2torch")

from test_models_face import randomized  # noqa: E402

from fame.models import IResNet, build_face_model, has_baked_normalization, load_onnx_backbone  # noqa: E402


class BakedNormalization(nn.Module):
    """An mxnet-style graph: raw 0..255 RGB in, (x - 127.5) * (1 / 127.5) as the first two nodes."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, pixels: Tensor) -> Tensor:
        return self.net((pixels - 127.5) * (1 / 127.5))


def export(net: nn.Module, path: Path, size: int, dynamic_size: bool = False) -> Path:
    """torch's TorchScript exporter (the dynamo one needs onnxscript), opset 17, dynamic batch."""
    spatial = {2: "height", 3: "width"} if dynamic_size else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net.eval(),
            (torch.rand(1, 3, size, size),),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["input.1"],
            output_names=["embedding"],
            dynamic_axes={"input.1": {0: "batch", **spatial}, "embedding": {0: "batch"}},
        )
    return path


@pytest.fixture(scope="module")
def net() -> IResNet:
    torch.manual_seed(0)
    return randomized(IResNet((1, 1, 1, 1), widths=(16, 32, 64, 128), embedding_size=128, input_size=64), seed=5)


@pytest.fixture(scope="module")
def plain_onnx(net, tmp_path_factory) -> Path:
    return export(net, tmp_path_factory.mktemp("onnx") / "w600k_small.onnx", 64)


@pytest.fixture(scope="module")
def baked_onnx(net, tmp_path_factory) -> Path:
    return export(BakedNormalization(net), tmp_path_factory.mktemp("onnx") / "mxnet_small.onnx", 64)


@pytest.fixture(scope="module")
def images() -> Tensor:
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(6))


@pytest.fixture(scope="module")
def reference(net, images) -> Tensor:
    with torch.no_grad():
        return net((images - 0.5) / 0.5)


def close(actual: Tensor, expected: Tensor) -> bool:
    """Within 1e-4 of the embedding's scale (the conversion reorders float operations)."""
    return bool((actual - expected).abs().max() <= 1e-4 * max(1.0, expected.abs().max().item()))


def test_exported_graph_needs_outside_normalization(plain_onnx, baked_onnx) -> None:
    assert not has_baked_normalization(onnx.load(str(plain_onnx)).graph)
    graph = onnx.load(str(baked_onnx)).graph
    assert [node.op_type for node in graph.node if node.op_type not in ("Identity", "Constant")][:2] == ["Sub", "Mul"]
    assert has_baked_normalization(graph)


def test_converted_model_matches_pytorch_and_onnxruntime(plain_onnx, images, reference) -> None:
    model = build_face_model("onnx", plain_onnx)
    assert (model.input_size, model.embedding_size, model.channel_order) == ((64, 64), 128, "RGB")
    assert torch.equal(model.mean.flatten(), torch.full((3,), 0.5)) and torch.equal(
        model.std.flatten(), torch.full((3,), 0.5)
    )
    assert not model.training and not model.net.training
    with torch.no_grad():
        embeddings = model(images)
    assert close(embeddings, reference)
    session = onnxruntime.InferenceSession(str(plain_onnx), providers=["CPUExecutionProvider"])
    (runtime,) = session.run(None, {"input.1": ((images.numpy() - 0.5) / 0.5).astype(np.float32)})
    assert close(embeddings, torch.from_numpy(runtime))


def test_gradients_reach_the_input(plain_onnx, images) -> None:
    model = build_face_model("onnx", plain_onnx)
    probe = images.clone().requires_grad_(True)
    reference = model(images.flip(3)).detach()
    torch.nn.functional.cosine_similarity(model(probe), reference).sum().backward()
    assert probe.grad is not None and probe.grad.shape == images.shape
    assert probe.grad.abs().sum() > 0 and torch.isfinite(probe.grad).all()


def test_baked_normalization_is_detected(baked_onnx, images, reference) -> None:
    model = build_face_model("onnx", baked_onnx)
    assert model.mean.flatten().tolist() == [0.0, 0.0, 0.0]
    assert torch.allclose(model.std.flatten(), torch.full((3,), 1 / 255))
    assert torch.allclose(model.network_input(images), images * 255, atol=1e-4)
    with torch.no_grad():
        assert close(model(images), reference)


def test_baked_normalization_can_be_overridden(baked_onnx) -> None:
    model = build_face_model("onnx", baked_onnx, baked_normalization=False)
    assert model.mean.flatten().tolist() == [0.5, 0.5, 0.5]


def test_bgr_option_swaps_channels(plain_onnx, net, images) -> None:
    model = build_face_model("onnx", plain_onnx, channel_order="BGR")
    assert model.channel_order == "BGR"
    with torch.no_grad():
        assert close(model(images), net((images.flip(1) - 0.5) / 0.5))


def test_backbone_reports_graph_shapes(plain_onnx) -> None:
    backbone = load_onnx_backbone(plain_onnx)
    assert (backbone.input_size, backbone.baked_normalization) == ((64, 64), False)
    assert not backbone.net.training


def test_open_input_size_must_be_given(net, tmp_path, images, reference) -> None:
    path = export(net, tmp_path / "open.onnx", 64, dynamic_size=True)
    assert load_onnx_backbone(path).input_size is None
    with pytest.raises(ValueError, match=r"not fixed; pass input_size=\(H, W\)"):
        build_face_model("onnx", path)
    model = build_face_model("onnx", path, input_size=64)
    assert (model.input_size, model.embedding_size) == ((64, 64), 128)
    with torch.no_grad():
        assert close(model(images), reference)


def test_deduplicated_weights_convert(tmp_path, images) -> None:
    """Freshly initialised nets share equal weights (PReLU slopes 0.25, BN biases 0), which the
    exporter de-duplicates into Identity nodes that onnx2torch alone cannot convert."""
    torch.manual_seed(0)
    fresh = IResNet((1, 1, 1, 1), widths=(16, 32, 64, 128), embedding_size=128, input_size=64).eval()
    path = export(fresh, tmp_path / "fresh.onnx", 64)
    graph = onnx.load(str(path)).graph
    weights = {tensor.name for tensor in graph.initializer}
    assert any(node.op_type == "Identity" and node.input[0] in weights for node in graph.node)
    model = build_face_model("onnx", path)
    with torch.no_grad():
        assert close(model(images), fresh((images - 0.5) / 0.5))


def test_onnx_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        build_face_model("onnx", tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match="needs checkpoint"):
        build_face_model("onnx")
