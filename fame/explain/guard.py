"""Leave a model exactly as it was found after explaining it."""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Iterator, Optional

import torch
from torch import nn


@contextmanager
def explaining(model: Optional[nn.Module]) -> Iterator[None]:
    """Run the body with gradients enabled, the model in eval mode and its parameters frozen.

    Leaves ``torch.inference_mode`` and ``torch.no_grad`` (as Lightning's validate / predict set
    them), so tensors made inside can enter autograd. On exit every module's train/eval flag,
    every parameter's ``requires_grad`` and ``.grad`` are restored to what they were, also when
    the body raises.
    """
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    modules = list(model.modules()) if model is not None else []
    parameters = list(model.parameters()) if model is not None else []
    training = [module.training for module in modules]
    requires_grad = [parameter.requires_grad for parameter in parameters]
    grads = [parameter.grad for parameter in parameters]
    with ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        try:
            for module in modules:
                module.training = False
            for parameter in parameters:
                parameter.requires_grad_(False)
            yield
        finally:
            for module, flag in zip(modules, training):
                module.training = flag
            for parameter, flag, grad in zip(parameters, requires_grad, grads):
                parameter.requires_grad_(flag)
                parameter.grad = grad
