"""The feature-map experiment (paper Sec. 4.1): ``python explain.py experiment=featuremap`` (explain.py
runs this stage when the config has a ``featuremap`` section).

For a few images: FAME's feature-map loss at every location (or an evenly spaced sub-grid) of each
configured layer, the share of each location's map mass outside its CAM cell per layer, and the
tiled sheet of every location of the sheet layer with each cell's CAM square marked.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from omegaconf import DictConfig

from ..explain import explain_feature_map, feature_map_size
from ..featuremap import feature_map_sheet, outside_mass_by_location, subset_grid, summarize_layers
from ..lightning.rank_zero import rank_zero_logger
from ..pipeline import checked_layer, explained_dataset, explained_model, selected_methods
from ..schemas import FeaturemapConfig, check, fame_options
from ..tasks import explained_inputs, task_of

log = rank_zero_logger(__name__)


def featuremap(config: DictConfig) -> pd.DataFrame:
    """Outside-cell share of FAME's mass per layer (one row per layer); writes CSV, markdown and sheets."""
    check(FeaturemapConfig, config)
    settings = config.featuremap
    fame_config = fame_options(selected_methods(config)["fame"], "explainer.fame")
    task = task_of(config.data.task)
    model = explained_model(config)
    dataset = explained_dataset(config)
    items = [dataset[i] for i in range(min(settings.images, len(dataset)))]
    pixels = torch.stack([item[task.image_key] for item in items])
    ids = [str(item["id"]) for item in items]
    images, model = explained_inputs(model, pixels, config.input_space)  # the paper perturbs the normalized tensor
    layers = list(settings.layers)
    for position, name in enumerate(layers):  # every layer name before the first map
        checked_layer(model, images[:1], name, f"featuremap.layers.{position}")
    checked_layer(model, images[:1], settings.sheet_layer, "featuremap.sheet_layer")
    chunk = settings.get("batch_size")  # locations per FAME batch (null: all of a layer's at once)
    by_location = outside_mass_by_location(
        model, images, layers, fame_config, settings.max_locations, batch_size=chunk, image_ids=ids
    )
    summary = summarize_layers(by_location)
    output = Path(settings.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    by_location.to_csv(output / "outside_mass_by_location.csv", index=False)
    summary.to_csv(output / "outside_mass.csv", index=False)
    (output / "outside_mass.md").write_text(
        "Share of each location's FAME mass outside its CAM cell (cell_floor: a map equal to its cell after "
        "the same blur; uniform: 1 - 1/(h*w))\n\n" + summary.to_markdown(index=False, floatfmt=".3f") + "\n"
    )
    height, width = feature_map_size(model, settings.sheet_layer, images[:1])
    locations = subset_grid(height, width)  # the sheet shows every cell of its layer
    for image, item in zip(images, items):
        maps = explain_feature_map(
            model, settings.sheet_layer, image.unsqueeze(0), locations, config=fame_config, batch_size=chunk
        )
        image = item[task.image_key]
        scale = max(1, 512 // (image.shape[-1] * width))
        feature_map_sheet(
            image,
            maps,
            height,
            width,
            output / f"sheet_{settings.sheet_layer}_{item['id']}.png",
            locations=locations,
            scale=scale,
            gap=4,
            line_width=2,
        )
    log.info(summary.to_string(index=False))
    log.info(
        f"wrote {output / 'outside_mass.md'}, the per-location CSV and {len(items)} sheets of {settings.sheet_layer}"
    )
    return summary
