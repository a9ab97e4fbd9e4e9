"""Do the heatmaps fall on the drawn opacities? Grad-CAM of the bundled classifier at several layers, against a
baseline that spreads heat uniformly over the lungs, on the same ../shared/data/lesions films.

For every lesions image with a drawn opacity mask (ground-glass opacity or consolidation, `masks_opacity/`),
each method's heat map (original image size) is scored by:
- pointing game: 1 when the hottest pixel lies inside a drawn opacity (the uniform baseline's expected value:
  the share of the lungs' area that is opacity);
- heat share in opacities: the share of the heat mass inside the drawn opacities;
- heat in lungs: the share of the heat mass inside the radiologists' lung masks (`masks/`).
The baseline's lungs are those the bundled lung segmenter finds (what a shipped baseline could use); its figures
are computed on exactly the images the Grad-CAM figures are. Means with 95 % bootstrap CIs over split groups.
The heatmap explains the predicted class. Prints one JSON object (--out writes it too).

    python benchmarks/heatmap_localisation.py --out docs/results/heatmap_localisation.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxrscreen.explain.cam import Explainer
from cxrscreen.io.files import write_json
from cxrscreen.io.xray import read_xray
from cxrscreen.lungs.masks import heat_share_inside, read_mask
from cxrscreen.lungs.segmenter import LungSegmenter
from cxrscreen.models.registry import get_spec
from cxrscreen.predict.predictor import Predictor, load_model
from cxrscreen.runs.provenance import provenance

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_LAYERS = ("blocks.3", "blocks.4", "blocks.5", "blocks.6")


def scores(heat: np.ndarray, opacity: np.ndarray, lungs: np.ndarray) -> dict[str, float]:
    """pointing (hottest pixel in an opacity), heat share in opacities, heat share in the lungs."""
    flat = int(np.argmax(heat))
    return {"pointing": float(opacity.flat[flat]), "heat_in_opacity": heat_share_inside(heat, opacity) or 0.0,
            "heat_in_lungs": heat_share_inside(heat, lungs) or 0.0}


def uniform_on_lungs(seg_lungs: np.ndarray, opacity: np.ndarray, lungs: np.ndarray) -> dict[str, float]:
    """The baseline: heat 1 on the segmented lungs, 0 elsewhere; its pointing game is the expected value of a
    random hottest pixel (all lung pixels tie)."""
    heat = seg_lungs.astype(np.float32)
    n = max(int(seg_lungs.sum()), 1)
    return {"pointing": float((opacity & seg_lungs).sum()) / n, "heat_in_opacity": heat_share_inside(heat, opacity)
            or 0.0, "heat_in_lungs": heat_share_inside(heat, lungs) or 0.0}


def summarise(rows: list[dict[str, float]], groups: list[str], n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    df = pd.DataFrame(rows)
    g = np.asarray(groups)
    uniq = np.unique(g)
    idx = [np.nonzero(g == u)[0] for u in uniq]
    rng = np.random.default_rng(seed)
    draws = [np.concatenate([idx[j] for j in rng.integers(0, len(uniq), len(uniq))]) for _ in range(n_boot)]
    out: dict[str, Any] = {"n": len(df)}
    for col in df.columns:
        v = df[col].to_numpy(np.float64)
        boots = np.array([v[d].mean() for d in draws])
        out[col] = {"mean": round(float(v.mean()), 4),
                    "ci95": [round(float(np.quantile(boots, 0.025)), 4), round(float(np.quantile(boots, 0.975)), 4)]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lesions", type=Path, default=ROOT.parent / "shared" / "data" / "lesions")
    ap.add_argument("--model", type=Path, default=None, help="classifier run (default: the bundled model)")
    ap.add_argument("--layers", nargs="+", default=list(DEFAULT_LAYERS))
    ap.add_argument("--lungs", type=Path, default=None, help="lung model folder (default: the bundled one)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N images (a quick check)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    t0 = time.monotonic()
    run = load_model(args.model)
    predictor = Predictor(run)
    seg = LungSegmenter.load(args.lungs)
    man = pd.read_csv(args.lesions / "manifest.csv", dtype=str, keep_default_na=False)
    explainers = {layer: Explainer(run, layer=layer, lungs=False) for layer in args.layers}
    per: dict[str, list[dict[str, float]]] = {k: [] for k in [*args.layers, "uniform_on_lungs"]}
    groups: list[str] = []
    if args.limit:
        man = man.iloc[: args.limit]
    for img, group in zip(man["image"], man["split_group"], strict=True):
        stem = Path(img).stem
        opath = args.lesions / "masks_opacity" / f"{stem}.png"
        if not opath.is_file():
            continue
        xray = read_xray(args.lesions / img)
        import cv2

        opacity = cv2.imread(str(opath), cv2.IMREAD_GRAYSCALE) > 127
        lungs = read_mask(args.lesions / "masks" / f"{stem}.png", xray.pixels.shape) > 0
        if not opacity.any():
            continue
        prep = predictor.prepare(xray)
        res = predictor.predict_prepared([prep])[0]
        for layer, ex in explainers.items():
            per[layer].append(scores(ex.heatmap(prep, res.label), opacity, lungs))
        per["uniform_on_lungs"].append(uniform_on_lungs(seg.segment(xray.pixels).mask > 0, opacity, lungs))
        groups.append(group)
    default_layer = run.config.get("cam_layer") or get_spec(run.arch).cam_layer
    result = {
        "benchmark": "heatmap_localisation",
        "data": "../shared/data/lesions (images with a drawn opacity mask)",
        "model": str(args.model or "bundled"), "arch": run.arch, "cam_layer_shipped": default_layer,
        "target": "the predicted class",
        "methods": {("gradcam:" + k if k in explainers else k): summarise(v, groups) for k, v in per.items()},
        "seconds": round(time.monotonic() - t0, 1), **provenance(),
    }
    if args.out:
        write_json(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
