"""Slow, literal versions of RISE, CorrRISE and FGGB: one mask, one pixel, one dimension at a time,
written from the definitions (DESIGN.md section 2) with numpy, scipy and skimage where those are
what the papers' own code used. The fast implementations are tested against these."""

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from skimage.transform import resize
from torchvision.transforms.v2 import functional as TF


def literal_rise_mask(grid, shift, size):
    """Petsiuk et al.'s mask: resize the s x s grid to (s + 1) * cell (skimage, order 1, reflect) and crop."""
    height, width = size
    cell_h, cell_w = math.ceil(height / grid.shape[0]), math.ceil(width / grid.shape[1])
    up = resize(grid, ((grid.shape[0] + 1) * cell_h, (grid.shape[1] + 1) * cell_w), order=1, mode="reflect",
                anti_aliasing=False)
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
