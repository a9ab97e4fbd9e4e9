"""Training throughput of resnet18 at 224 px and the data pipeline's rate on ../shared/data/cxr.

Prints JSON: data pipeline images/s (decode + CLAHE + resize, no cache) and training images/s
(forward + backward + step, batch 32, random init) on this machine's threads.

    python benchmarks/train_throughput.py [--data ../shared/data/cxr] [--images 200] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from cxrscreen.data.manifest import manifest_root, read_manifest, resolve_image_paths
from cxrscreen.models.registry import create_model
from cxrscreen.runs.provenance import package_versions
from cxrscreen.transforms.augment import train_transform
from cxrscreen.transforms.cache import PreprocessedCache
from cxrscreen.transforms.preprocess import PreprocessConfig


def pipeline_rate(paths: list[Path], size: int) -> float:
    cache = PreprocessedCache(PreprocessConfig(image_size=size), cache_dir=None)  # no cache: decode every time
    t0 = time.perf_counter()
    for p in paths:
        cache.get(p)
    return len(paths) / (time.perf_counter() - t0)


def train_rate(arch: str, size: int, batch: int, steps: int) -> float:
    model = create_model(arch)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    aug = train_transform(PreprocessConfig(image_size=size))
    imgs = torch.randint(0, 256, (batch, 1, size, size), dtype=torch.uint8)
    y = torch.randint(0, 3, (batch,))
    model.train()

    def step() -> None:
        x = torch.stack([aug(i) for i in imgs])
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1] / ".." / "shared/data/cxr")
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    df = read_manifest(args.data).sample(frac=1.0, random_state=0).head(args.images)
    paths = resolve_image_paths(df, manifest_root(args.data))
    result = {
        "benchmark": "train_throughput",
        "threads": args.threads,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "pipeline_images": len(paths),
        "pipeline_images_per_s_224": round(pipeline_rate(paths, 224), 1),
        "train_resnet18_224_images_per_s": round(train_rate("resnet18", 224, 32, args.steps), 2),
        "train_batch": 32,
        "note": "training rate includes the per-image train augmentation; pipeline = read + CLAHE + resize",
        "versions": package_versions(),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
