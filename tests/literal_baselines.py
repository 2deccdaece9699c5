"""Slow, literal versions of RISE, CorrRISE, FGGB and RISE's deletion / insertion metric: one mask,
one pixel, one dimension, one step at a time, written from the papers' definitions with numpy,
scipy and skimage where those are what the papers' own code used. The fast implementations are
tested against these."""

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from scipy.stats import spearmanr
from skimage.transform import resize
from torchvision.transforms.v2 import functional as TF


def literal_rise_mask(grid, shift, size):
    """Petsiuk et al.'s mask: resize the s x s grid to (s + 1) * cell (skimage, order 1, reflect) and crop."""
    height, width = size
    cell_h, cell_w = math.ceil(height / grid.shape[0]), math.ceil(width / grid.shape[1])
    up = resize(
        grid, ((grid.shape[0] + 1) * cell_h, (grid.shape[1] + 1) * cell_w), order=1, mode="reflect", anti_aliasing=False
    )
    return up[shift[0] : shift[0] + height, shift[1] : shift[1] + width]


def literal_rise(model, images, targets, grids, shifts, probability):
    """sum_i p(o | I * M_i) M_i / (N p), one image and one mask at a time (float64 numpy)."""
    model.eval()
    saliency = np.zeros((images.shape[0], *images.shape[-2:]))
    with torch.no_grad():
        for b, target in enumerate(targets):
            for grid, shift in zip(grids.numpy(), shifts.numpy()):
                mask = literal_rise_mask(grid, shift, images.shape[-2:])
                masked = images[b] * torch.from_numpy(mask).to(images.dtype)
                score = model(masked.unsqueeze(0)).softmax(dim=1)[0, target].item()
                saliency[b] += score * mask
    return saliency / (len(grids) * probability)


def literal_corrrise_masks(generator, count, size, patches, patch_size):
    """Keep-indicators drawn in the implementation's order (all tops, then all lefts), painted one patch at a time."""
    height, width = size
    tops = torch.randint(0, height - patch_size + 1, (count, patches), generator=generator)
    lefts = torch.randint(0, width - patch_size + 1, (count, patches), generator=generator)
    keep = np.ones((count, height, width), dtype=bool)
    for i in range(count):
        for top, left in zip(tops[i].tolist(), lefts[i].tolist()):
            keep[i, top : top + patch_size, left : left + patch_size] = False
    return keep


def literal_corrrise(model, images, references, keep):
    """Spearman correlation of each pixel's keep-indicator with the per-mask similarities (scipy),
    one pair, one mask and one pixel at a time; split into (e+, e-) and divided by their maxima."""
    model.eval()
    similar, dissimilar = [], []
    with torch.no_grad():
        for image, reference in zip(images, references):
            frozen = F.normalize(model(reference.unsqueeze(0)), dim=1)[0]
            scores = []
            for mask in keep:
                masked = image * torch.from_numpy(mask).to(image.dtype)
                scores.append(float(F.normalize(model(masked.unsqueeze(0)), dim=1)[0] @ frozen))
            correlation = np.zeros(keep.shape[1:])
            for row in range(keep.shape[1]):
                for col in range(keep.shape[2]):
                    pixel = keep[:, row, col]
                    if pixel.all() or not pixel.any():
                        continue
                    rho = spearmanr(pixel, scores).statistic
                    correlation[row, col] = 0.0 if np.isnan(rho) else rho
            positive, negative = np.maximum(correlation, 0), np.maximum(-correlation, 0)
            similar.append(positive / (positive.max() + 1e-8))
            dissimilar.append(negative / (negative.max() + 1e-8))
    return np.stack(similar), np.stack(dissimilar)


def literal_fggb(model, images, references, threshold, kernel, sigma, gradient_of="normalized"):
    """Backpropagate each dimension of the normalized embedding (``gradient_of="normalized"``) or
    of the raw feature phi(x) (``"raw"``, Lu et al.'s paper) on its own; weight the L2-normalized
    |gradient| maps by (v_k - theta / D), v from the normalized embeddings; split, blur, divide by
    the maxima."""
    model.eval()
    similar, dissimilar = [], []
    for image, reference in zip(images, references):
        with torch.no_grad():
            frozen = F.normalize(model(reference.unsqueeze(0)), dim=1)[0]
        x = image.unsqueeze(0).clone().requires_grad_(True)
        feature = model(x)[0]
        embedding = feature / feature.norm()
        differentiated = embedding if gradient_of == "normalized" else feature
        dims = embedding.shape[0]
        total = torch.zeros(image.shape[-2:], dtype=image.dtype)
        for k in range(dims):
            (gradient,) = torch.autograd.grad(differentiated[k], x, retain_graph=True)
            grad_map = gradient[0].abs().mean(dim=0)
            grad_map = grad_map / grad_map.norm()
            weight = embedding[k].item() * frozen[k].item() - threshold / dims
            total += weight * grad_map
        for parts, part in ((similar, total.clamp(min=0)), (dissimilar, (-total).clamp(min=0))):
            blurred = TF.gaussian_blur(part[None, None], [kernel, kernel], [sigma, sigma])[0, 0]
            parts.append((blurred / (blurred.max() + 1e-8)).numpy())
    return np.stack(similar), np.stack(dissimilar)


def literal_rise_gkern(klen, nsig, channels):
    """RISE's ``gkern``: scipy's gaussian_filter of a centred impulse, on the diagonal of a
    (channels, channels, klen, klen) convolution weight."""
    impulse = np.zeros((klen, klen))
    impulse[klen // 2, klen // 2] = 1
    kernel = gaussian_filter(impulse, nsig)
    weight = np.zeros((channels, channels, klen, klen))
    for channel in range(channels):
        weight[channel, channel] = kernel
    return torch.from_numpy(weight)


def literal_rise_auc(scores):
    """RISE's ``auc``: (sum of the points - half the first - half the last) / number of steps."""
    return (scores.sum() - scores[0] / 2 - scores[-1] / 2) / (scores.shape[0] - 1)


def literal_causal_metric(net, normalized_image, explanation, mode, step):
    """Petsiuk et al.'s ``CausalMetric.single_run`` for one image (1, C, H, W) already normalized
    (``net`` sees the normalized tensor, softmax appended as in RISE's evaluation): the class is
    the intact image's top-1; deletion goes to zeros of the normalized tensor, insertion starts
    from its blur (``gkern(11, 5)``, zero padding); ``step`` pixels per step in the order of
    ``flip(argsort(explanation))`` (a stable argsort: numpy's default sort leaves ties in an
    unspecified order). Returns (scores, auc)."""
    _, channels, height, width = normalized_image.shape
    pixels = height * width
    with torch.no_grad():
        target = int(net(normalized_image).softmax(dim=1).argmax(dim=1)[0])
        steps = (pixels + step - 1) // step
        if mode == "del":
            start, finish = normalized_image.clone(), torch.zeros_like(normalized_image)
        else:
            kernel = literal_rise_gkern(11, 5, channels).to(normalized_image.dtype)
            start, finish = F.conv2d(normalized_image, kernel, padding=11 // 2), normalized_image.clone()
        scores = np.empty(steps + 1)
        salient_order = np.flip(np.argsort(explanation.reshape(-1, pixels), axis=1, kind="stable"), axis=-1)
        for i in range(steps + 1):
            scores[i] = net(start).softmax(dim=1)[0, target].item()
            if i < steps:
                coords = salient_order[:, step * i : step * (i + 1)]
                start.numpy().reshape(1, channels, pixels)[0, :, coords] = finish.numpy().reshape(1, channels, pixels)[
                    0, :, coords
                ]
    return scores, literal_rise_auc(scores)


def literal_reinitialize(module, seed):
    """Quantus / Adebayo et al.'s re-initialisation of a subtree under a global seed: ``reset_parameters()``
    of every module that has it, BatchNorm statistics reset (``reset_running_stats()``)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for submodule in module.modules():
            if hasattr(submodule, "reset_parameters"):
                submodule.reset_parameters()
            if hasattr(submodule, "reset_running_stats"):
                submodule.reset_running_stats()
