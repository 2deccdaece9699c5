"""insightface model-zoo ONNX recognition models (e.g. ``w600k_r50.onnx``) as differentiable PyTorch modules.

The graph is converted with onnx2torch, so gradients flow to the input. The networks take NCHW
crops; insightface feeds them RGB (``cv2.dnn.blobFromImages(..., swapRB=True)`` on BGR images)
and decides the normalization from the graph: when a ``Sub`` and a ``Mul`` node open the graph
(mxnet-converted models) the normalization is baked in and the input is raw 0..255 pixels,
otherwise the input is (pixel - 127.5) / 127.5.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    import onnx

#: How many leading operator nodes insightface inspects for a baked-in normalization.
LEADING_NODES = 8


@dataclass(frozen=True)
class OnnxBackbone:
    """A converted ONNX network (in eval mode) and what its graph says about its input."""

    net: nn.Module
    input_size: tuple[int, int] | None
    baked_normalization: bool


def _inline_constant_identities(graph: onnx.GraphProto) -> None:
    """Replace ``Identity`` nodes that merely alias an initializer by a copy of that initializer.

    torch's exporter emits them when it de-duplicates equal weights; onnx2torch expects weights
    to be initializers.
    """
    from onnx import numpy_helper

    initializers = {tensor.name: tensor for tensor in graph.initializer}
    aliases = [node for node in graph.node if node.op_type == "Identity" and node.input[0] in initializers]
    for node in aliases:
        graph.initializer.append(
            numpy_helper.from_array(numpy_helper.to_array(initializers[node.input[0]]), node.output[0])
        )
        graph.node.remove(node)


def has_baked_normalization(graph: onnx.GraphProto) -> bool:
    """insightface's rule: a ``Sub`` and a ``Mul`` among the first operator nodes of the graph."""
    leading = [node for node in graph.node if node.op_type not in ("Identity", "Constant")][:LEADING_NODES]
    subtracts = any(node.op_type == "Sub" or node.name.startswith(("Sub", "_minus")) for node in leading)
    multiplies = any(node.op_type == "Mul" or node.name.startswith(("Mul", "_mul")) for node in leading)
    return subtracts and multiplies


def _static_dims(value: onnx.ValueInfoProto) -> list[int | None]:
    return [dim.dim_value if dim.HasField("dim_value") else None for dim in value.type.tensor_type.shape.dim]


def load_onnx_backbone(path: str | os.PathLike) -> OnnxBackbone:
    """Read an ONNX recognition model with one NCHW image input and one embedding output."""
    try:
        import onnx
        from onnx2torch import convert
    except ImportError as error:
        raise ImportError(
            f"Loading ONNX face models needs onnx and onnx2torch: pip install onnx onnx2torch ({error})"
        ) from error

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model not found: {path}")
    model = onnx.load(str(path))
    graph = model.graph
    initializer_names = {tensor.name for tensor in graph.initializer}
    inputs = [value for value in graph.input if value.name not in initializer_names]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise ValueError(
            f"{path}: expected a recognition model with one image input and one embedding output, "
            f"found inputs {[value.name for value in inputs]} and outputs {[value.name for value in graph.output]}"
        )
    input_dims = _static_dims(inputs[0])
    if len(input_dims) != 4 or input_dims[1] not in (3, None):
        raise ValueError(f"{path}: expected an NCHW input (N, 3, H, W), the graph declares {input_dims}")
    input_size = (input_dims[2], input_dims[3]) if None not in input_dims[2:] else None
    baked = has_baked_normalization(graph)
    _inline_constant_identities(graph)
    net = convert(model).eval()
    return OnnxBackbone(net=net, input_size=input_size, baked_normalization=baked)
