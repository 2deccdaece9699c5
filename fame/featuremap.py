"""The feature-map experiment (paper Sec. 4.1): how far does a layer location's evidence reach?

CAM-style methods upsample an h x w feature map to the H x W image, so location (r, c) of the
grid is credited with one block of the image, its "CAM cell" (rows r*H/h .. (r+1)*H/h, columns
c*W/w .. (c+1)*W/w). FAME explains one location directly (the loss sum_c |a_c[k]|, see
:func:`fame.explain.explain_feature_map`), so the share of its map that lies outside that cell
measures how much CAM's assumption misses. This module computes the cells, that share, the tiled
h x w sheet of maps with each cell's square drawn, and a per-layer report.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import Tensor, nn

from .explain import FameConfig, blur_maps, explain_feature_map, feature_map_size, normalize_maps
from .explain.objectives import check_locations, grid_locations, resolve_layer
from .viz import overlay

#: Colour of the CAM squares on the sheet (RGB in [0, 1]); pure green never occurs in a jet overlay.
SQUARE_COLOUR = (0.0, 1.0, 0.0)
#: Colour of the gaps between tiles and of tiles without a map.
GAP_COLOUR = (1.0, 1.0, 1.0)


def _edges(cells: int, pixels: int) -> np.ndarray:
    """Pixel boundaries of ``cells`` equal blocks of ``pixels``: round(i * pixels / cells), i = 0..cells."""
    if cells < 1 or pixels < cells:
        raise ValueError(f"cannot split {pixels} pixels into {cells} cells; need 1 <= cells <= pixels")
    return np.floor(np.arange(cells + 1) * pixels / cells + 0.5).astype(np.int64)


def cam_cells(h: int, w: int, H: int, W: int) -> Tensor:
    """Image-space box of each cell of an h x w grid on an H x W image: (h * w, 4) long tensor.

    Row-major like :func:`fame.explain.explain_feature_map`'s default locations; each row is
    (top, left, bottom, right) with bottom/right exclusive. The cell of location (r, c) is the
    H/h x W/w block that CAM upsampling attributes to it; when H is not a multiple of h the
    boundaries are rounded to the nearest pixel.
    """
    rows, cols = _edges(h, H), _edges(w, W)
    boxes = [(rows[r], cols[c], rows[r + 1], cols[c + 1]) for r in range(h) for c in range(w)]
    return torch.tensor(boxes, dtype=torch.long)


def _location_boxes(h: int, w: int, H: int, W: int, locations: Optional[Tensor], count: int) -> Tensor:
    boxes = cam_cells(h, w, H, W)
    if locations is None:
        if count != h * w:
            raise ValueError(
                f"got {count} maps for a {h}x{w} grid ({h * w} locations); pass the (row, col) "
                "locations the maps belong to"
            )
        return boxes
    locations = check_locations(locations, h, w, "cpu")
    if locations.shape[0] != count:
        raise ValueError(f"got {count} maps but {locations.shape[0]} locations; they must match one to one")
    return boxes[locations[:, 0] * w + locations[:, 1]]


def outside_cell_mass(
    maps: Tensor, h: int, w: int, locations: Optional[Union[Sequence[Tuple[int, int]], Tensor]] = None
) -> Tensor:
    """Share of each map's mass outside its location's CAM cell: (L,) float.

    ``maps`` (L, 1, H, W) are the maps of the locations of an h x w grid: all of them row-major
    (``locations=None``) or the given (row, col) pairs. The share is
    1 - sum(map inside the cell) / sum(map); a uniform map scores 1 - 1/(h*w), a map inside its
    cell 0. A map without mass (all zeros: the location's activation was already zero, so FAME
    took no step) has no share: NaN.
    """
    if not isinstance(maps, Tensor) or maps.dim() != 4 or maps.shape[1] != 1:
        shape = tuple(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__
        raise ValueError(f"maps must have shape (L, 1, H, W), got {shape}")
    count, _, height, width = maps.shape
    boxes = _location_boxes(h, w, height, width, None if locations is None else torch.as_tensor(locations), count)
    values = maps[:, 0].detach().double()
    rows = torch.arange(height, device=maps.device).view(1, -1, 1)
    cols = torch.arange(width, device=maps.device).view(1, 1, -1)
    boxes = boxes.to(maps.device)
    top, left, bottom, right = (boxes[:, k].view(-1, 1, 1) for k in range(4))
    inside = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
    total = values.sum(dim=(1, 2))
    within = (values * inside).sum(dim=(1, 2))
    share = torch.where(total > 0, 1.0 - within / total.clamp_min(torch.finfo(values.dtype).tiny), torch.nan)
    return share.float().cpu()


#: Cells blurred at once by :func:`cell_floor`.
CELL_CHUNK = 16


def cell_floor(h: int, w: int, H: int, W: int, config: Optional[FameConfig] = None) -> Tensor:
    """Outside share (h * w,) that a map equal to its CAM cell would have after FAME's blur and normalization.

    The blur alone spreads mass across a small cell's border, so this is the lowest share FAME's
    post-processing (``config``'s blur and normalization) allows: read the measured share against it.
    """
    config = config or FameConfig()
    boxes = cam_cells(h, w, H, W).tolist()
    shares = []
    for start in range(0, len(boxes), CELL_CHUNK):  # the float64 blur unfolds: bound its memory
        chunk = boxes[start : start + CELL_CHUNK]
        cells = torch.zeros(len(chunk), 1, H, W, dtype=torch.float64)
        for index, (top, left, bottom, right) in enumerate(chunk):
            cells[index, 0, top:bottom, left:right] = 1.0
        maps = normalize_maps(blur_maps(cells, config.odd_blur_kernel, config.blur_sigma), config.normalization)
        locations = torch.arange(start, start + len(chunk))
        shares.append(outside_cell_mass(maps, h, w, torch.stack([locations // w, locations % w], dim=1)))
    return torch.cat(shares)


def _draw_square(tile: np.ndarray, box: Tuple[int, int, int, int], colour, width: int) -> None:
    """Outline ``box`` (top, left, bottom, right; exclusive) on ``tile`` in place, ``width`` pixels inside it."""
    top, left, bottom, right = box
    width = max(1, min(width, (bottom - top + 1) // 2, (right - left + 1) // 2))
    tile[top : top + width, left:right] = colour
    tile[bottom - width : bottom, left:right] = colour
    tile[top:bottom, left : left + width] = colour
    tile[top:bottom, right - width : right] = colour


def feature_map_tiles(
    image: Union[Tensor, np.ndarray],
    maps: Tensor,
    h: int,
    w: int,
    locations: Optional[Union[Sequence[Tuple[int, int]], Tensor]] = None,
    scale: int = 1,
    gap: int = 2,
    line_width: int = 1,
    alpha: float = 0.5,
) -> np.ndarray:
    """The h x w sheet as an RGB array in [0, 1]: tile (r, c) shows location (r, c)'s map over the image.

    Each tile is the image (C, H, W) in [0, 1] with the map overlaid (jet, ``alpha``), enlarged
    ``scale`` times (nearest neighbour), with the location's CAM cell outlined in
    :data:`SQUARE_COLOUR` (``line_width`` pixels, drawn just inside the cell). Tiles are
    separated by ``gap`` pixels of :data:`GAP_COLOUR`; grid positions without a map stay blank.
    Shape: (h * S + (h - 1) * gap, w * S' + (w - 1) * gap, 3) with S = H * scale, S' = W * scale.
    """
    if int(scale) != scale or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale}")
    count, _, height, width = maps.shape
    locations = grid_locations(h, w) if locations is None else check_locations(locations, h, w, "cpu")
    boxes = _location_boxes(h, w, height, width, locations.cpu(), count) * scale
    tile_h, tile_w = height * scale, width * scale
    sheet = np.empty((h * tile_h + (h - 1) * gap, w * tile_w + (w - 1) * gap, 3), dtype=np.float32)
    sheet[:] = GAP_COLOUR
    for index, (row, col) in enumerate(locations.cpu().tolist()):
        tile = overlay(image, maps[index], alpha=alpha).astype(np.float32)
        tile = np.repeat(np.repeat(tile, scale, axis=0), scale, axis=1)
        _draw_square(tile, tuple(boxes[index].tolist()), SQUARE_COLOUR, line_width)
        top, left = row * (tile_h + gap), col * (tile_w + gap)
        sheet[top : top + tile_h, left : left + tile_w] = tile
    return sheet


def feature_map_sheet(
    image: Union[Tensor, np.ndarray],
    maps: Tensor,
    h: int,
    w: int,
    path: Union[str, Path],
    locations: Optional[Union[Sequence[Tuple[int, int]], Tensor]] = None,
    scale: int = 1,
    gap: int = 2,
    line_width: int = 1,
    alpha: float = 0.5,
) -> Path:
    """Write :func:`feature_map_tiles` as an 8-bit RGB PNG at ``path`` (pixel-exact, no resampling)."""
    sheet = feature_map_tiles(image, maps, h, w, locations, scale=scale, gap=gap, line_width=line_width, alpha=alpha)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(sheet * 255.0).astype(np.uint8), mode="RGB").save(path)
    return path


def subset_grid(h: int, w: int, max_locations: Optional[int] = None) -> Tensor:
    """Locations (L, 2) to explain on an h x w grid: all of them, or an evenly spaced sub-grid.

    With ``max_locations`` smaller than h * w, k = floor(sqrt(max_locations)) rows and k columns
    (at most h and w) are taken at evenly spaced positions, corners included (rounded
    ``linspace(0, h - 1, k)``), so the sub-grid covers the border and the centre of the image alike.
    """
    if max_locations is None or max_locations >= h * w:
        return grid_locations(h, w)
    if max_locations < 1:
        raise ValueError(f"max_locations must be a positive number or None, got {max_locations}")
    side = max(1, math.isqrt(int(max_locations)))
    rows = np.unique(np.round(np.linspace(0, h - 1, min(side, h))).astype(np.int64))
    cols = np.unique(np.round(np.linspace(0, w - 1, min(side, w))).astype(np.int64))
    return torch.tensor([(r, c) for r in rows for c in cols], dtype=torch.long)


def outside_mass_by_location(
    model: nn.Module,
    images: Tensor,
    layers: Sequence[str],
    config: Optional[FameConfig] = None,
    max_locations: Optional[int] = None,
    batch_size: Optional[int] = None,
    image_ids: Optional[Sequence[str]] = None,
) -> pd.DataFrame:
    """FAME's outside-cell share for every (layer, image, location): one row each.

    Runs :func:`fame.explain.explain_feature_map` for each image (B, C, H, W) and each layer name,
    on all locations of the layer's grid or the :func:`subset_grid` of ``max_locations``.
    Columns: layer, grid_h, grid_w, image, row, col, outside_mass (NaN for an empty map),
    cell_floor (:func:`cell_floor`: the share of a map equal to the cell after the same
    blur), iterations, initial_loss.
    """
    if images.dim() == 3:
        images = images.unsqueeze(0)
    ids = list(image_ids) if image_ids is not None else [str(i) for i in range(images.shape[0])]
    if len(ids) != images.shape[0]:
        raise ValueError(f"got {len(ids)} image ids for {images.shape[0]} images")
    records = []
    for layer in layers:
        module = resolve_layer(model, layer)
        for image, image_id in zip(images, ids):
            image = image.unsqueeze(0)
            h, w = feature_map_size(model, module, image)
            locations = subset_grid(h, w, max_locations).to(image.device)
            maps, stats = explain_feature_map(
                model, module, image, locations, config=config, batch_size=batch_size, return_stats=True
            )
            shares = outside_cell_mass(maps, h, w, locations.cpu())
            floors = cell_floor(h, w, image.shape[-2], image.shape[-1], config)
            for k, (row, col) in enumerate(locations.cpu().tolist()):
                records.append(
                    {
                        "layer": layer,
                        "grid_h": h,
                        "grid_w": w,
                        "image": image_id,
                        "row": row,
                        "col": col,
                        "outside_mass": float(shares[k]),
                        "cell_floor": float(floors[row * w + col]),
                        "iterations": int(stats.iterations[k]),
                        "initial_loss": float(stats.initial_loss[k]),
                    }
                )
    return pd.DataFrame.from_records(records)


def summarize_layers(by_location: pd.DataFrame) -> pd.DataFrame:
    """Per layer: grid, locations explained, maps with mass, mean / median / quartiles of the outside share.

    ``uniform`` is the share a map spread evenly over the image would have (1 - 1/(h*w)),
    ``cell_floor`` the mean share of a map equal to its cell after FAME's blur; empty maps (NaN)
    are counted in ``empty`` and left out of the statistics.
    """
    rows = []
    for layer, group in by_location.groupby("layer", sort=False):
        shares = group["outside_mass"].dropna()
        h, w = int(group["grid_h"].iloc[0]), int(group["grid_w"].iloc[0])
        rows.append(
            {
                "layer": layer,
                "grid": f"{h}x{w}",
                "images": group["image"].nunique(),
                "locations": len(group) // max(1, group["image"].nunique()),
                "maps": len(shares),
                "empty": int(group["outside_mass"].isna().sum()),
                "mean": shares.mean(),
                "median": shares.median(),
                "q25": shares.quantile(0.25),
                "q75": shares.quantile(0.75),
                "cell_floor": group["cell_floor"].mean(),
                "uniform": 1.0 - 1.0 / (h * w),
            }
        )
    return pd.DataFrame.from_records(rows)


def layer_report(
    model: nn.Module,
    images: Tensor,
    layers: Sequence[str] = ("layer1", "layer2", "layer3", "layer4"),
    config: Optional[FameConfig] = None,
    max_locations: Optional[int] = None,
    batch_size: Optional[int] = None,
    image_ids: Optional[Sequence[str]] = None,
) -> pd.DataFrame:
    """The Sec. 4.1 claim as numbers: outside-cell share of FAME's mass per layer, over locations and images.

    ``model`` and ``images`` are what FAME perturbs (for a :class:`fame.models.Classifier` either the
    wrapper with [0, 1] images, or ``classifier.net`` with ``classifier.normalize(images)`` as the
    paper does); ``layers`` are submodule names (layer1..layer4 for torchvision ResNets). Big layers
    can be explained on an evenly spaced sub-grid of about ``max_locations`` locations
    (:func:`subset_grid`); ``batch_size`` chunks the locations of one image. Returns one row per
    layer (see :func:`summarize_layers`).
    """
    by_location = outside_mass_by_location(model, images, layers, config, max_locations, batch_size, image_ids)
    return summarize_layers(by_location)
