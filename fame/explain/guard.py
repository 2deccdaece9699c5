"""Leave a model exactly as it was found after explaining it."""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Iterator, Optional

import torch
from torch import nn


@contextmanager
def explaining(model: Optional[nn.Module], channels_last: bool = False) -> Iterator[None]:
    """Run the body with gradients enabled, the model in eval mode and its parameters frozen.

    Leaves ``torch.inference_mode`` and ``torch.no_grad`` (as Lightning's validate / predict set
    them), so tensors made inside can enter autograd. With ``channels_last`` the model's 4-D
    parameters and buffers are converted to channels-last memory format for the body (a copy of
    those tensors; the originals are kept aside untouched). On exit every module's train/eval
    flag, every parameter's ``requires_grad``, ``.grad`` and data and every buffer are restored
    to what they were, also when the body raises.
    """
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    modules = list(model.modules()) if model is not None else []
    parameters = list(model.parameters()) if model is not None else []
    training = [module.training for module in modules]
    requires_grad = [parameter.requires_grad for parameter in parameters]
    grads = [parameter.grad for parameter in parameters]
    data = [parameter.data for parameter in parameters]
    buffers = [dict(module._buffers) for module in modules]
    with ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        try:
            for module in modules:
                module.training = False
            for parameter in parameters:
                parameter.requires_grad_(False)
            if channels_last and model is not None:
                model.to(memory_format=torch.channels_last)
            yield
        finally:
            for module, flag, kept in zip(modules, training, buffers):
                module.training = flag
                module._buffers.update(kept)
            for parameter, flag, grad, tensor in zip(parameters, requires_grad, grads, data):
                parameter.data = tensor
                parameter.requires_grad_(flag)
                parameter.grad = grad
