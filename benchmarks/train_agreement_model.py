"""Train the network the speed benchmark measures map agreement on (README, "Speed").

A torchvision ResNet-18 (6 classes) trained from scratch on the synthetic shapes data at 112 px
within a time budget; the weights are stored in float16 (about 22 MB) so the checkpoint can be
committed and travel to a GPU machine that has no network:

    python benchmarks/train_agreement_model.py                    # CPU, stops after --minutes
    python benchmarks/train_agreement_model.py --device cuda --epochs 12 --min-accuracy 0.6
                                                                  # retrain only if the saved one is worse

Load it with ``load_agreement_model`` (float32 weights, eval mode).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torchvision
from torch import nn

from fame.data import ShapesDataset

CHECKPOINT = Path(__file__).parent / "checkpoints" / "resnet18_shapes112.pt"
IMAGE_SIZE = 112
CLASSES = 6
#: Seeds of the shapes data: training images and the held-out images the benchmark explains.
TRAIN_SEED, TEST_SEED = 0, 1


def build_model() -> nn.Module:
    return torchvision.models.resnet18(weights=None, num_classes=CLASSES)


def load_agreement_model(path: Path = CHECKPOINT, device="cpu") -> nn.Module:
    """The trained ResNet-18 in float32, eval mode."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    model = build_model()
    model.load_state_dict(
        {
            name: tensor.float() if tensor.is_floating_point() else tensor
            for name, tensor in checkpoint["state_dict"].items()
        }
    )
    return model.to(device).eval()


def shapes_batch(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` shapes images (count, 3, 112, 112) in [0, 1] and their labels."""
    dataset = ShapesDataset(count, image_size=IMAGE_SIZE, seed=seed, num_classes=CLASSES)
    items = [dataset[i] for i in range(count)]
    return torch.stack([item["image"] for item in items]), torch.tensor([item["label"] for item in items])


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        predictions = torch.cat([model(images[i : i + 64]).argmax(dim=1) for i in range(0, len(images), 64)])
    return float((predictions == labels).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-images", type=int, default=2048)
    parser.add_argument("--test-images", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--minutes", type=float, default=8.0, help="stop after this much training time")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--min-accuracy",
        type=float,
        default=None,
        help="keep an existing checkpoint whose held-out accuracy reaches this",
    )
    parser.add_argument("--resume", action="store_true", help="continue from the weights in --out")
    parser.add_argument("--out", type=Path, default=CHECKPOINT)
    args = parser.parse_args()

    if args.min_accuracy is not None and args.out.exists():
        kept = torch.load(args.out, map_location="cpu", weights_only=True)["held_out_accuracy"]
        if kept >= args.min_accuracy:
            print(f"{args.out} has held-out accuracy {kept:.3f} >= {args.min_accuracy}: kept")
            return
        print(f"{args.out} has held-out accuracy {kept:.3f} < {args.min_accuracy}: retraining on {args.device}")
    device = torch.device(args.device)
    torch.manual_seed(0)
    images, labels = (tensor.to(device) for tensor in shapes_batch(args.train_images, TRAIN_SEED))
    test_images, test_labels = (tensor.to(device) for tensor in shapes_batch(args.test_images, TEST_SEED))
    model = load_agreement_model(args.out, device).train() if args.resume else build_model().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    steps = args.epochs * ((len(images) + args.batch_size - 1) // args.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    started = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(images), device=device)
        for start in range(0, len(images), args.batch_size):
            batch = order[start : start + args.batch_size]
            flips = torch.rand(len(batch), device=device) < 0.5
            inputs = torch.where(flips.view(-1, 1, 1, 1), images[batch].flip(-1), images[batch])
            loss = nn.functional.cross_entropy(model(inputs), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        model.eval()
        minutes = (time.perf_counter() - started) / 60
        print(
            f"epoch {epoch + 1}: loss {loss.item():.3f}, held-out accuracy "
            f"{accuracy(model, test_images, test_labels):.3f} ({minutes:.1f} min)",
            flush=True,
        )
        if minutes > args.minutes:
            break
    test_accuracy = accuracy(model, test_images, test_labels)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    model.cpu()
    state = {
        name: tensor.half() if tensor.is_floating_point() else tensor for name, tensor in model.state_dict().items()
    }
    torch.save(
        {
            "state_dict": state,
            "arch": "resnet18",
            "num_classes": CLASSES,
            "image_size": IMAGE_SIZE,
            "data": f"ShapesDataset(seed={TRAIN_SEED}, image_size={IMAGE_SIZE})",
            "held_out_accuracy": test_accuracy,
            "torch": str(torch.__version__),
        },
        args.out,
    )
    print(f"held-out accuracy {test_accuracy:.3f}; wrote {args.out} ({args.out.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
