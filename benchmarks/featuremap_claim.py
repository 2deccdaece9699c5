"""The Sec. 4.1 claim as a number, on a ResNet-18 this codebase trains on the shapes data.

    python benchmarks/featuremap_claim.py            # trains once (CPU, about 30 min), then reports

Trains torchvision's ResNet-18 (random init, 4 classes) on the synthetic shapes with
:class:`fame.lightning.ImageClassifier`, or loads ``--checkpoint`` if it exists (a float16
state_dict of the torchvision network, loadable with
``fame.models.build_classifier("resnet18", weights=path, num_classes=4)``), prints its test
accuracy, then runs ``python explain.py experiment=featuremap`` (configs/experiment/featuremap.yaml:
4 test images, layer1..layer4, 100 FAME iterations on the ImageNet-normalized tensor) with its
output under ``--output``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import lightning as L
import torch

from fame.data import ShapesDataset
from fame.data.modules import ClassificationDataModule
from fame.lightning.classifier import ImageClassifier
from fame.models import build_classifier
from fame.stages.featuremap import featuremap
from hydra import compose, initialize_config_dir

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=HERE / "checkpoints" / "shapes_resnet18.pt")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "featuremap")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--train-size", type=int, default=2400)
    parser.add_argument("--test-size", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--max-minutes", type=float, default=30.0, help="training time limit")
    args = parser.parse_args()

    if not args.checkpoint.is_file():
        train(args)
    classifier = build_classifier("resnet18", weights=args.checkpoint, num_classes=NUM_CLASSES)
    test_accuracy = accuracy(classifier, ShapesDataset(args.test_size, args.image_size, SEEDS["test"], NUM_CLASSES))
    print(f"test accuracy {100 * test_accuracy:.1f}%", flush=True)
    with initialize_config_dir(config_dir=str(HERE.parent / "configs"), version_base="1.3"):
        config = compose("explain", overrides=["experiment=featuremap", f"model.weights={args.checkpoint}",
                                               f"featuremap.output_dir={args.output}"])
    start = time.perf_counter()
    featuremap(config)
    print(f"FAME feature-map runs took {(time.perf_counter() - start) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
