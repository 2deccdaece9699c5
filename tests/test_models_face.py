"""Face backbones: strict loading of arcface_torch / AdaFace files, the FaceEmbedder contract, small net."""

from __future__ import annotations

import argparse

import pytest
import torch
from torch import nn

from fame.models import (
    ADAFACE_LAYERS,
    IRESNET_LAYERS,
    AdaFaceIR,
    FaceEmbedder,
    IResNet,
    UntrustedCheckpointError,
    adaface_ir,
    build_face_model,
    face_arch_names,
    guess_face_arch,
    iresnet,
    target_layer,
)

BN_KEYS = 5  # weight, bias, running_mean, running_var, num_batches_tracked


def randomized(net: nn.Module, seed: int) -> nn.Module:
    """Give every parameter and BN statistic distinct random values, so a wrong load shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(net.named_parameters()) + list(net.named_buffers()):
            if not tensor.dtype.is_floating_point:
                continue
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            elif tensor.dim() > 1:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * (2.0 / tensor[0].numel()) ** 0.5)
            else:
                tensor.copy_(
                    torch.rand(tensor.shape, generator=generator) * 0.4 + (0.8 if name.endswith("weight") else -0.2)
                )
    return net.eval()


@pytest.fixture(scope="module")
def iresnet18_net() -> IResNet:
    torch.manual_seed(0)
    return randomized(iresnet(18), seed=1)


@pytest.fixture(scope="module")
def adaface18_net() -> AdaFaceIR:
    torch.manual_seed(0)
    return randomized(adaface_ir(18), seed=2)


@pytest.fixture(scope="module")
def faces() -> torch.Tensor:
    return torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def iresnet18_embeddings(iresnet18_net, faces) -> torch.Tensor:
    """What arcface_torch computes: RGB pixels in 0..255, (x - 127.5) / 127.5."""
    with torch.no_grad():
        return iresnet18_net((faces * 255 - 127.5) / 127.5)


@pytest.fixture(scope="module")
def adaface18_embeddings(adaface18_net, faces) -> torch.Tensor:
    """What AdaFace computes: BGR in [0, 1], (x - 0.5) / 0.5."""
    with torch.no_grad():
        return adaface18_net((faces[:, [2, 1, 0]] - 0.5) / 0.5)


# ---------------------------------------------------------------- layouts of every depth (no forward)


@pytest.mark.parametrize("depth", sorted(IRESNET_LAYERS))
def test_iresnet_keys_follow_the_arcface_torch_layout(depth: int) -> None:
    with torch.device("meta"):
        state = iresnet(depth).state_dict()
    layers = IRESNET_LAYERS[depth]
    # stem conv1/bn1/prelu; per block bn1 conv1 bn2 prelu conv2 bn3; a downsample conv+BN per stage; bn2 fc features
    assert len(state) == (1 + BN_KEYS + 1) + sum(layers) * (3 * BN_KEYS + 3) + 4 * (1 + BN_KEYS) + (
        BN_KEYS + 2 + BN_KEYS
    )
    assert tuple(state["conv1.weight"].shape) == (64, 3, 3, 3)
    assert tuple(state["layer4.0.downsample.0.weight"].shape) == (512, 256, 1, 1)
    assert tuple(state[f"layer3.{layers[2] - 1}.conv2.weight"].shape) == (256, 256, 3, 3)
    assert f"layer3.{layers[2]}.bn1.weight" not in state
    assert "layer1.1.downsample.0.weight" not in state
    assert tuple(state["fc.weight"].shape) == (512, 512 * 7 * 7)
    assert tuple(state["features.running_mean"].shape) == (512,)
    assert guess_face_arch(state) == f"iresnet{depth}"
    assert guess_face_arch("module." + key for key in state) == f"iresnet{depth}"


@pytest.mark.parametrize("depth", sorted(ADAFACE_LAYERS))
def test_adaface_keys_follow_the_released_layout(depth: int) -> None:
    with torch.device("meta"):
        state = adaface_ir(depth).state_dict()
    layers = ADAFACE_LAYERS[depth]
    first_units = [sum(layers[:stage]) for stage in range(4)]
    # input_layer conv/BN/PReLU; per unit BN conv BN PReLU conv BN; conv+BN shortcuts where the width changes;
    # output_layer BN, Linear, BatchNorm1d(affine=False)
    assert len(state) == (1 + BN_KEYS + 1) + sum(layers) * (3 * BN_KEYS + 3) + 3 * (1 + BN_KEYS) + (BN_KEYS + 2 + 3)
    assert f"body.{first_units[0]}.shortcut_layer.0.weight" not in state  # 64 -> 64: a strided 1x1 max-pool
    assert tuple(state[f"body.{first_units[3]}.shortcut_layer.0.weight"].shape) == (512, 256, 1, 1)
    assert tuple(state[f"body.{sum(layers) - 1}.res_layer.4.weight"].shape) == (512, 512, 3, 3)
    assert tuple(state["output_layer.3.weight"].shape) == (512, 512 * 7 * 7)
    assert "output_layer.4.weight" not in state and "output_layer.4.running_var" in state
    assert guess_face_arch("model." + key for key in state) == f"adaface_ir{depth}"


# ---------------------------------------------------------------- arcface_torch files


def test_arcface_torch_backbone_round_trip(tmp_path, iresnet18_net, faces, iresnet18_embeddings) -> None:
    path = tmp_path / "backbone.pth"
    torch.save(iresnet18_net.state_dict(), path)
    model = build_face_model("iresnet18", path)
    assert isinstance(model, FaceEmbedder) and not model.training
    assert (model.channel_order, model.input_size, model.embedding_size) == ("RGB", (112, 112), 512)
    assert torch.equal(model.mean.flatten(), torch.full((3,), 0.5)) and torch.equal(
        model.std.flatten(), torch.full((3,), 0.5)
    )
    for key, value in iresnet18_net.state_dict().items():
        assert torch.equal(model.net.state_dict()[key], value), key
    with torch.no_grad():
        embeddings = model(faces)
    assert (embeddings - iresnet18_embeddings).abs().max() <= 1e-5 * iresnet18_embeddings.abs().max()


def test_ddp_prefixed_model_pt_loads(tmp_path, iresnet18_net) -> None:
    path = tmp_path / "model.pt"
    torch.save({"module." + key: value for key, value in iresnet18_net.state_dict().items()}, path)
    model = build_face_model("iresnet18", path)
    for key, value in iresnet18_net.state_dict().items():
        assert torch.equal(model.net.state_dict()[key], value), key


def _error(tmp_path, arch: str, state: dict, name: str = "backbone.pth") -> str:
    path = tmp_path / name
    torch.save(state, path)
    with pytest.raises(ValueError) as caught:
        build_face_model(arch, path)
    message = str(caught.value)
    assert str(path) in message
    return message


@pytest.fixture(scope="module")
def small_net() -> IResNet:
    torch.manual_seed(0)
    return randomized(IResNet((1, 1, 1, 1), widths=(16, 32, 64, 128), embedding_size=128, input_size=64), seed=4)


def test_missing_key_is_named(tmp_path, small_net) -> None:
    state = dict(small_net.state_dict())
    del state["layer2.0.prelu.weight"]
    message = _error(tmp_path, "small", state)
    assert "does not match small: 1 missing key(s): layer2.0.prelu.weight." in message
    assert "unexpected" not in message


def test_many_missing_keys_are_summarised(tmp_path, small_net) -> None:
    state = {key: value for key, value in small_net.state_dict().items() if not key.startswith("layer4.")}
    message = _error(tmp_path, "small", state)
    # 4 BNs x 4 tensors + conv1, prelu, conv2, downsample conv; the batch counters may be absent
    assert "20 missing key(s): layer4.0.bn1.weight, layer4.0.bn1.bias, layer4.0.bn1.running_mean, " in message
    assert "... (15 more)" in message
    assert "fit none of the known layouts" in message


def test_extra_key_is_named(tmp_path, small_net) -> None:
    state = {**small_net.state_dict(), "head.weight": torch.zeros(3, 128)}
    assert "1 unexpected key(s): head.weight" in _error(tmp_path, "small", state)


def test_wrong_shape_names_both_shapes(tmp_path, small_net) -> None:
    state = {**small_net.state_dict(), "fc.weight": torch.zeros(64, 128 * 4 * 4), "fc.bias": torch.zeros(64)}
    message = _error(tmp_path, "small", state)
    assert "fc.weight (expected (128, 2048), file has (64, 2048))" in message
    assert "embedding_size" in message  # the hint for a file of the right layout but other sizes


def test_missing_batch_counters_are_tolerated(tmp_path, small_net) -> None:
    path = tmp_path / "old.pth"
    torch.save({key: value for key, value in small_net.state_dict().items() if "num_batches_tracked" not in key}, path)
    model = build_face_model("small", path)
    assert torch.equal(model.net.fc.weight, small_net.fc.weight)


def test_wrong_depth_hints_at_the_right_arch(tmp_path, iresnet18_net) -> None:
    message = _error(tmp_path, "iresnet34", iresnet18_net.state_dict())
    assert "does not match iresnet34" in message and "arch='iresnet18'" in message


def test_adaface_file_given_to_iresnet_says_so(tmp_path, adaface18_net) -> None:
    message = _error(tmp_path, "iresnet18", adaface18_net.state_dict())
    assert "arch='adaface_ir18'" in message and "missing key(s)" in message


def test_missing_checkpoint_names_the_path(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere/backbone.pth"):
        build_face_model("iresnet18", tmp_path / "nowhere" / "backbone.pth")


def test_full_pickled_model_is_rejected_with_advice(tmp_path) -> None:
    path = tmp_path / "model.pt"
    torch.save({"conv1.weight": [1, 2]}, path)  # loads under weights_only but is no state_dict of tensors
    with pytest.raises(ValueError, match="not tensors"):
        build_face_model("small", path)


def test_unknown_arch_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="iresnet50, iresnet100"):
        build_face_model("iresnet42")
    assert {"iresnet18", "iresnet200", "adaface_ir18", "adaface_ir101", "onnx", "small"} <= set(face_arch_names())


# ---------------------------------------------------------------- AdaFace Lightning .ckpt files


def _adaface_ckpt(net: nn.Module, **extra) -> dict:
    state = {"model." + key: value for key, value in net.state_dict().items()}
    state["head.kernel"] = torch.randn(512, 7)
    state["head.t"] = torch.zeros(1)
    return {"epoch": 24, "global_step": 1000, "state_dict": state, **extra}


def test_adaface_ckpt_round_trip_in_bgr(tmp_path, adaface18_net, faces, adaface18_embeddings) -> None:
    path = tmp_path / "adaface_ir18_webface4m.ckpt"
    torch.save(_adaface_ckpt(adaface18_net), path)
    model = build_face_model("adaface_ir18", path)
    assert (model.channel_order, model.input_size, model.embedding_size) == ("BGR", (112, 112), 512)
    assert torch.equal(model.network_input(faces), (faces[:, [2, 1, 0]] - 0.5) / 0.5)
    with torch.no_grad():
        assert torch.equal(model(faces), adaface18_embeddings)


def test_adaface_ckpt_with_pickled_hyper_parameters_needs_trust(tmp_path, adaface18_net) -> None:
    path = tmp_path / "adaface_ir18.ckpt"
    torch.save(_adaface_ckpt(adaface18_net, hyper_parameters=argparse.Namespace(arch="ir_18", m=0.4)), path)
    with pytest.raises(UntrustedCheckpointError, match="argparse.Namespace") as caught:
        build_face_model("adaface_ir18", path)
    assert "trust=True" in str(caught.value) and str(path) in str(caught.value)
    model = build_face_model("adaface_ir18", path, trust=True)
    for key, value in adaface18_net.state_dict().items():
        assert torch.equal(model.net.state_dict()[key], value), key


def test_adaface_ckpt_with_a_foreign_key_fails(tmp_path, adaface18_net) -> None:
    checkpoint = _adaface_ckpt(adaface18_net)
    checkpoint["state_dict"]["ema.model.input_layer.0.weight"] = torch.zeros(1)
    del checkpoint["state_dict"]["model.body.7.res_layer.1.weight"]
    path = tmp_path / "adaface.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(ValueError) as caught:
        build_face_model("adaface_ir18", path)
    message = str(caught.value)
    assert "missing key(s): body.7.res_layer.1.weight" in message
    assert "unexpected key(s): ema.model.input_layer.0.weight" in message


# ---------------------------------------------------------------- FaceEmbedder contract and the small net


def test_face_embedder_rejects_unaligned_sizes() -> None:
    model = build_face_model("small")
    with pytest.raises(ValueError, match=r"\(B, 3, 64, 64\)"):
        model(torch.rand(1, 3, 112, 112))


def test_overrides_of_order_and_normalization(tmp_path, small_net) -> None:
    path = tmp_path / "small.pth"
    torch.save(small_net.state_dict(), path)
    model = build_face_model("small", path, channel_order="BGR", mean=(0.4, 0.5, 0.6), std=0.25)
    images = torch.rand(2, 3, 64, 64)
    expected = (images.flip(1) - torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1)) / 0.25
    assert torch.equal(model.network_input(images), expected)
    with torch.no_grad():
        assert torch.equal(model(images), small_net(expected))


def test_small_model_is_fast_and_differentiable() -> None:
    torch.manual_seed(0)
    model = build_face_model("small")
    assert (model.input_size, model.embedding_size, model.channel_order) == ((64, 64), 128, "RGB")
    images = torch.rand(3, 3, 64, 64, requires_grad=True)
    model(images).pow(2).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    larger = build_face_model("small", input_size=112, embedding_size=64)
    assert larger(torch.rand(2, 3, 112, 112)).shape == (2, 64)


def test_face_target_layers() -> None:
    small = build_face_model("small")
    assert target_layer(small) is small.net.layer4[-1]
    with torch.device("meta"):
        adaface = adaface_ir(50)
    assert target_layer(adaface) is adaface.body[-1]
