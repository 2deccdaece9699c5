"""Throughput of the FAME engine: batched vs one image at a time, and the feature-map sheet.

    python benchmarks/fame_speed.py                      # ResNet-50, 224 px, 500 iterations
    python benchmarks/fame_speed.py --arch resnet18 --size 64 --iterations 20 --batch-sizes 1 4

Prints one line per setting and writes the figures as JSON (--json). Random weights: speed does
not depend on them, and nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torchvision

from fame import FameConfig, explain_classification, explain_feature_map


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function, device):
    synchronize(device)
    start = time.perf_counter()
    result = function()
    synchronize(device)
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--iterations", type=int, default=500)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--single-images", type=int, default=2, help="images timed one at a time")
    parser.add_argument("--layer", default="layer4", help="layer of the feature-map sheet ('' to skip)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    model = torchvision.models.get_model(args.arch, weights=None).to(device).eval()
    blur = max(3, round(49 * args.size / 224)) | 1
    config = FameConfig(iterations=args.iterations, blur_kernel=blur, blur_sigma=7.7 * args.size / 224)
    generator = torch.Generator().manual_seed(0)
    largest = max(args.batch_sizes + [args.single_images])
    images = torch.rand(largest, 3, args.size, args.size, generator=generator).to(device)
    targets = torch.randint(0, 1000, (largest,), generator=generator).to(device)
    explain_classification(model, images[:1], targets[:1], config.replace(iterations=2))  # warm-up

    figures = {"arch": args.arch, "size": args.size, "iterations": args.iterations, "device": str(device),
               "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
               "torch": torch.__version__, "runs": []}
    print(f"{args.arch} at {args.size} px, {args.iterations} iterations on {figures['device_name']}")

    seconds, _ = timed(lambda: [explain_classification(model, images[i : i + 1], targets[i : i + 1], config)
                                for i in range(args.single_images)], device)
    per_image = seconds / args.single_images
    figures["runs"].append({"mode": "one at a time", "batch": 1, "seconds_per_image": per_image})
    print(f"  one image at a time : {per_image:8.3f} s/image")
    for batch in args.batch_sizes:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds, _ = timed(lambda: explain_classification(model, images[:batch], targets[:batch], config), device)
        memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        figures["runs"].append({"mode": "batched", "batch": batch, "seconds_per_image": seconds / batch,
                                "peak_memory_gib": memory})
        print(f"  batch {batch:4d}          : {seconds / batch:8.3f} s/image  ({per_image * batch / seconds:5.1f}x, "
              f"peak {memory:.1f} GiB)")
    if args.layer:
        seconds, maps = timed(lambda: explain_feature_map(model, args.layer, images[0], config=config), device)
        figures["feature_map_sheet"] = {"layer": args.layer, "locations": int(maps.shape[0]), "seconds": seconds}
        print(f"  feature-map sheet   : {maps.shape[0]} locations of {args.layer} in {seconds:.2f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
