"""A deliberately naive FAME, written from the FAME paper's update rule, one image at a time.

Plain loops, numpy for the blur, no batching tricks: the engine must agree with it.
"""

import math

import numpy as np
import torch


def naive_gray(image):
    """(C, H, W) -> (H, W) with the luma weights 0.2989, 0.587, 0.114."""
    if image.shape[0] == 1:
        return image[0]
    return 0.2989 * image[0] + 0.587 * image[1] + 0.114 * image[2]


def naive_gaussian_blur(array, kernel, sigma):
    """2-D Gaussian blur with reflect padding, as a double loop over output pixels."""
    if kernel % 2 == 0:
        kernel += 1
    half = (kernel - 1) / 2
    offsets = [i - half for i in range(kernel)]
    weights = [math.exp(-0.5 * (o / sigma) ** 2) for o in offsets]
    total = sum(weights)
    weights = [w / total for w in weights]
    pad = kernel // 2
    padded = np.pad(array, pad, mode="reflect")
    height, width = array.shape
    out = np.zeros_like(array)
    for i in range(height):
        for j in range(width):
            value = 0.0
            for a in range(kernel):
                for b in range(kernel):
                    value += weights[a] * weights[b] * padded[i + a, j + b]
            out[i, j] = value
    return out


def naive_fame(
    loss_of_one,
    image,
    step_size,
    iterations,
    epsilon=None,
    blur_kernel=None,
    blur_sigma=1.0,
    normalization="minmax",
    clamp=None,
):
    """FAME map (H, W) as a numpy array for one image (C, H, W) and a scalar loss function."""
    x = image.clone()
    for _ in range(iterations):
        x = x.detach().requires_grad_(True)
        loss = loss_of_one(x.unsqueeze(0))
        if epsilon is not None and loss.item() < epsilon:
            break
        (gradient,) = torch.autograd.grad(loss, x)
        biggest = gradient.abs().max()
        if biggest > 0:
            x = x - step_size * gradient / biggest
        if clamp is not None:
            x = x.clamp(*clamp)
    difference = (naive_gray(x.detach()) - naive_gray(image)).abs().numpy()
    if difference.max() > 0:
        difference = difference / difference.max()
    if blur_kernel is not None:
        difference = naive_gaussian_blur(difference, blur_kernel, blur_sigma)
    if normalization == "minmax":
        difference = (difference - difference.min()) / (difference.max() - difference.min() + 1e-8)
    elif normalization == "max":
        difference = difference / (difference.max() + 1e-8)
    return difference


def naive_classification_loss(logits, target, loss):
    """The classification loss variants of one sample, written out from their definitions."""
    z = [logits[k] for k in range(logits.shape[0])]
    if loss == "logit":
        return z[target]
    if loss == "abs_logit":
        return z[target].abs()
    exponentials = [value.exp() for value in z]
    if loss == "log_softmax":
        return (exponentials[target] / sum(exponentials)).log()
    if loss == "probability":
        return exponentials[target] / sum(exponentials)
    if loss == "margin":
        return z[target] - max(value for k, value in enumerate(z) if k != target)
    raise ValueError(loss)
