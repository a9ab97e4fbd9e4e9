"""Check the shipped severity zones against the BrixIA radiologists (evaluation only; nothing is fitted).

Reads ../shared/data/cxr/annotations/brixia_scores.csv (CC BY-NC-SA 4.0: it stays in ../shared; this script
only writes figures) and scores every image with the bundled classifier + severity regressor + lung
segmenter (`cxrscreen predict --severity`'s scorer). Each zone's 0-4 extent is put on the Brixia 0-3 scale by
the fixed mapping of `severity.zones.brixia_of_extent` (x 3/4, rounded). Compared with the senior radiologist
(`S-A`..`S-F`):
- zones: the scorer's six zones (the extent spread over each segmented lung's thirds by the spatial map);
- spread: the whole-image geographic extent spread evenly (every zone = extent / 2 on the 0-4 scale), the
  reference a zone map has to beat;
- junior: the junior radiologist (`J-A`..`J-F`), the ceiling a model is judged against.
Figures: zone MAE and exact agreement (over images x 6 zones), global (0-18) MAE, each with a 95 % bootstrap
CI over split groups; also on the images the bundled severity regressor was not fitted on (its training set is
Cohen et al.'s severity_scores.csv).

    python scripts/brixia_check.py --out docs/results/severity/brixia_check.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxrscreen.io.files import write_json
from cxrscreen.io.xray import read_xray
from cxrscreen.predict.predictor import load_model
from cxrscreen.runs.provenance import provenance
from cxrscreen.severity.scorer import SeverityScorer
from cxrscreen.severity.scores import read_scores
from cxrscreen.severity.zones import BRIXIA_PER_EXTENT

ROOT = Path(__file__).resolve().parents[1]
ZONES = "ABCDEF"


def figures(pred: np.ndarray, senior: np.ndarray, groups: np.ndarray, n_boot: int = 2000, seed: int = 0
            ) -> dict[str, Any]:
    """Zone MAE, exact agreement and global MAE of (N, 6) integer zone scores against the senior's."""
    err = np.abs(pred - senior)
    exact = (pred == senior).astype(np.float64)
    gerr = np.abs(pred.sum(1) - senior.sum(1))
    uniq = np.unique(groups)
    idx = [np.nonzero(groups == u)[0] for u in uniq]
    rng = np.random.default_rng(seed)
    draws = [np.concatenate([idx[j] for j in rng.integers(0, len(uniq), len(uniq))]) for _ in range(n_boot)]

    def stat(values: np.ndarray) -> dict[str, Any]:
        boots = np.array([values[d].mean() for d in draws])
        return {"value": round(float(values.mean()), 3),
                "ci95": [round(float(np.quantile(boots, 0.025)), 3), round(float(np.quantile(boots, 0.975)), 3)]}

    return {"n_images": len(pred), "zone_mae": stat(err.mean(1)), "zone_exact_agreement": stat(exact.mean(1)),
            "global_mae": stat(gerr.astype(np.float64))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cxr")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    t0 = time.monotonic()
    table = pd.read_csv(args.data / "annotations" / "brixia_scores.csv", dtype={"image": str})
    man = pd.read_csv(args.data / "manifest.csv", dtype=str, keep_default_na=False)
    group_of = dict(zip(man["image"], man["split_group"], strict=True))
    fitted_on = set(read_scores(args.data / "annotations" / "severity_scores.csv")["image"])
    run = load_model(None)
    scorer = SeverityScorer.for_run(run)
    zones, spread, sources = [], [], []
    for img in table["image"]:
        sev = scorer.score(read_xray(args.data / img))
        by = {z["brixia"]: z for z in sev["zones"]}
        zones.append([by[k]["brixia_score"] for k in ZONES])
        even = sev["geographic_extent"] / 2 * BRIXIA_PER_EXTENT
        spread.append([int(np.clip(np.rint(even), 0, 3))] * 6)
        sources.append(sev["lung_boxes_source"])
    senior = table[[f"S-{k}" for k in ZONES]].to_numpy(np.int64)
    junior = table[[f"J-{k}" for k in ZONES]].to_numpy(np.int64)
    groups = np.array([group_of[i] for i in table["image"]])
    pred_z, pred_s = np.array(zones, np.int64), np.array(spread, np.int64)
    held = np.array([i not in fitted_on for i in table["image"]])
    out: dict[str, Any] = {
        "check": "severity zones against the BrixIA senior radiologist",
        "data": "../shared/data/cxr/annotations/brixia_scores.csv (162 Cohen images; CC BY-NC-SA 4.0, read in place)",
        "mapping": "zone extent 0-4 x 3/4, rounded, clipped to 0-3 (fixed; nothing fitted on Brixia scores)",
        "lungs_found": {lg: int(sum(s[lg] == "segmentation" for s in sources)) for lg in ("right", "left")},
        "all_images": {"zones": figures(pred_z, senior, groups), "spread": figures(pred_s, senior, groups),
                       "junior": figures(junior, senior, groups)},
        "not_in_severity_training": {
            "zones": figures(pred_z[held], senior[held], groups[held]),
            "spread": figures(pred_s[held], senior[held], groups[held]),
            "junior": figures(junior[held], senior[held], groups[held])},
        "seconds": round(time.monotonic() - t0, 1), **provenance(),
    }
    if args.out:
        write_json(args.out, out)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
