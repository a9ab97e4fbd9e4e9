"""The `lungs` resize mode's two box sources on real films: how far apart the boxes are, and what each costs.

For `--images` X-rays of ../shared/data/cxr (shuffled, seed 3) it reads the lungs' box (10 % margin) from the
full-size mask (`lung_box: mask`) and from the segmenter's 128 px grid (`lung_box: grid`), and prints one JSON
object: the largest coordinate difference per image as a fraction of its long side (median, max), and the
preprocessing time per image of each source (CLAHE off, 224 px, the best `lungs` candidate's settings; the two
sources alternate twice and the faster pass of each is kept).

    python scripts/lung_box_check.py --images 60
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from cxrscreen.data.manifest import manifest_root, read_manifest, resolve_image_paths
from cxrscreen.io.xray import read_xray
from cxrscreen.transforms.ops import PreprocessConfig
from cxrscreen.transforms.preprocess import Preprocessor, lungs_box

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "cxr")
    ap.add_argument("--images", type=int, default=60)
    args = ap.parse_args()
    df = read_manifest(args.data).sample(frac=1.0, random_state=3).head(args.images)
    pixels = [read_xray(p).pixels for p in resolve_image_paths(df, manifest_root(args.data))]
    diffs = []
    for x in pixels:  # fresh copies: the segmenter remembers the arrays it has seen
        a = np.array(lungs_box(x.copy(), 0.1, "mask"))
        b = np.array(lungs_box(x.copy(), 0.1, "grid"))
        diffs.append(float(np.abs(a - b).max() / max(x.shape)))
    mask_cfg = PreprocessConfig(resize_mode="lungs", clahe=False, image_size=224, center_fraction=0.9, mean=0.5,
                                std=0.5)
    ms: dict[str, list[float]] = {"mask": [], "grid": []}
    for cfg in (mask_cfg, dataclasses.replace(mask_cfg, lung_box="grid")) * 2:
        pre = Preprocessor(cfg)
        t0 = time.perf_counter()
        for x in pixels:
            pre(x.copy())
        ms[cfg.lung_box].append(1000 * (time.perf_counter() - t0) / len(pixels))
    print(json.dumps({"images": len(pixels),
                      "box_difference_of_long_side": {"median": round(float(np.median(diffs)), 4),
                                                      "max": round(float(np.max(diffs)), 4)},
                      "preprocess_ms_per_image": {k: round(min(v), 1) for k, v in ms.items()}}, indent=2))


if __name__ == "__main__":
    main()
