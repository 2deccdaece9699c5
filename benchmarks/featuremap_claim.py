"""The Sec. 4.1 claim as a number, on a ResNet-18 this codebase trains on the shapes data.

    python benchmarks/featuremap_claim.py            # trains once (CPU, a few minutes), then reports

Trains torchvision's ResNet-18 (random init, 4 classes) on the synthetic shapes with
:class:`fame.lightning.ImageClassifier`, or loads ``--checkpoint`` if it exists (a float16
state_dict of the torchvision network, loadable with
``fame.models.build_classifier("resnet18", weights=path, num_classes=4)``). Then, for
``--images`` test images, runs FAME's feature-map loss at the locations of layer1..layer4 and
reports the share of each map's mass outside the location's CAM cell
(:func:`fame.featuremap.layer_report`). FAME perturbs the ImageNet-normalized tensor, as the paper
does for classification. Writes a markdown table and example sheets next to ``--output``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import lightning as L
import torch

from fame.data import ShapesDataset
from fame.data.modules import ClassificationDataModule
from fame.explain import FameConfig, explain_feature_map, feature_map_size
from fame.featuremap import feature_map_sheet, outside_mass_by_location, subset_grid, summarize_layers
from fame.lightning.classifier import ImageClassifier
from fame.models import build_classifier

HERE = Path(__file__).resolve().parent
NUM_CLASSES = 4
SEEDS = {"train": 1, "val": 2, "test": 3}  # as configs/data/shapes.yaml


def train(args) -> None:
    """Train the ResNet-18 and save its network's state_dict in float16."""
    L.seed_everything(0, workers=True)
    data = ClassificationDataModule(
        train=ShapesDataset(args.train_size, args.image_size, SEEDS["train"], NUM_CLASSES),
        val=ShapesDataset(500, args.image_size, SEEDS["val"], NUM_CLASSES),
        batch_size=64, seed=0,
    )
    module = ImageClassifier({"name": "resnet18", "weights": None, "num_classes": NUM_CLASSES}, lr=3e-3)
    module.model.train()  # build_classifier returns eval mode and Lightning keeps submodule modes as found
    trainer = L.Trainer(max_epochs=args.epochs, max_time={"minutes": args.max_minutes}, accelerator="cpu",
                        logger=False, enable_checkpointing=False, enable_progress_bar=False)
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    print(f"trained for {trainer.current_epoch} epoch(s) in {time.perf_counter() - start:.0f} s", flush=True)
    state = {key: value.half() if value.is_floating_point() else value
             for key, value in module.model.net.state_dict().items()}
    args.checkpoint.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, args.checkpoint)
    print(f"saved {args.checkpoint} ({args.checkpoint.stat().st_size / 2**20:.1f} MiB)", flush=True)


@torch.no_grad()
def accuracy(classifier, dataset, batch_size: int = 100) -> float:
    correct = 0
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        images = torch.stack([item["image"] for item in items])
        labels = torch.tensor([item["label"] for item in items])
        correct += int((classifier(images).argmax(dim=1) == labels).sum())
    return correct / len(dataset)


def markdown(summary, args, test_accuracy: float, seconds: float) -> str:
    lines = [
        "# Feature-map experiment (paper Sec. 4.1) on the shapes ResNet-18",
        "",
        f"Model: torchvision ResNet-18, random init, trained by `benchmarks/featuremap_claim.py` on "
        f"{args.train_size} synthetic shapes images ({args.image_size} px, {NUM_CLASSES} classes); "
        f"test accuracy {100 * test_accuracy:.1f}% on {args.test_size} test images.",
        f"FAME: feature-map loss sum_c |a_c[k]|, {args.iterations} iterations, step 1/255 on the "
        f"ImageNet-normalized tensor, blur kernel {args.blur_kernel} / sigma {args.blur_sigma} "
        f"(the paper's 49 / 7.7 scaled to {args.image_size} px), min-max normalization; "
        f"{args.images} test images; grids larger than {args.max_locations} locations explained on an "
        f"evenly spaced sub-grid (`fame.featuremap.subset_grid`). Run time {seconds / 60:.1f} min on CPU.",
        "",
        "Share of each location's map mass outside its CAM cell (the H/h x W/w block CAM upsampling "
        "credits to it). `cell floor`: the share of a map equal to its cell after the same blur and "
        "normalization (the least FAME's post-processing allows); `uniform`: a map spread evenly over "
        "the image, 1 - 1/(h*w).",
        "",
        "| layer | grid | locations x images | empty maps | mean | median | q25 | q75 | cell floor | uniform |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summary.itertuples():
        lines.append(
            f"| {row.layer} | {row.grid} | {row.locations} x {row.images} | {row.empty} | {row.mean:.3f} | "
            f"{row.median:.3f} | {row.q25:.3f} | {row.q75:.3f} | {row.cell_floor:.3f} | {row.uniform:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=HERE / "checkpoints" / "shapes_resnet18.pt")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "featuremap_claim.md")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--train-size", type=int, default=2400)
    parser.add_argument("--test-size", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--max-minutes", type=float, default=30.0, help="training time limit")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--blur-kernel", type=int, default=15)
    parser.add_argument("--blur-sigma", type=float, default=2.2)
    parser.add_argument("--max-locations", type=int, default=16)
    parser.add_argument("--layers", nargs="+", default=["layer1", "layer2", "layer3", "layer4"])
    args = parser.parse_args()

    if not args.checkpoint.is_file():
        train(args)
    classifier = build_classifier("resnet18", weights=args.checkpoint, num_classes=NUM_CLASSES)
    test = ShapesDataset(args.test_size, args.image_size, SEEDS["test"], NUM_CLASSES)
    test_accuracy = accuracy(classifier, test)
    print(f"test accuracy {100 * test_accuracy:.1f}%", flush=True)

    items = [test[i] for i in range(args.images)]
    images = torch.stack([item["image"] for item in items])
    inputs = classifier.normalize(images)
    config = FameConfig(iterations=args.iterations, blur_kernel=args.blur_kernel, blur_sigma=args.blur_sigma)
    start = time.perf_counter()
    by_location = outside_mass_by_location(classifier.net, inputs, args.layers, config, args.max_locations,
                                           image_ids=[item["id"] for item in items])
    seconds = time.perf_counter() - start
    summary = summarize_layers(by_location)
    print(summary.to_string(index=False), flush=True)

    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(markdown(summary, args, test_accuracy, seconds))
    by_location.to_csv(args.output.with_suffix(".csv"), index=False)
    for layer, name in (("layer4", "featuremap_sheet.png"), ("layer3", "featuremap_sheet_layer3.png")):
        if layer not in args.layers:
            continue
        h, w = feature_map_size(classifier.net, layer, inputs[:1])
        locations = subset_grid(h, w, args.max_locations)
        maps = explain_feature_map(classifier.net, layer, inputs[:1], locations, config=config)
        feature_map_sheet(images[0], maps, h, w, args.output.parent / name, locations=locations,
                          scale=max(1, 512 // (args.image_size * w)), gap=4, line_width=2)
    print(f"wrote {args.output}, {args.output.with_suffix('.csv').name} and the sheets", flush=True)


if __name__ == "__main__":
    main()
