"""Pictures for the README: the segmented lungs with their Brixia thirds, and the shipped heatmap with its
caption band and the severity zones' band, on a few openly licensed films (CC BY / CC BY 4.0 only).

    python scripts/lung_pictures.py --out docs/screenshots

Writes <out>/lungs_<n>.png (lungs in colour, zone cuts and letters; a drawn opacity outlined in red where
../shared/data/lesions has one) and <out>/heatmap_<n>.png (what `cxrscreen predict --heatmap --severity` writes).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import pandas as pd

from cxrscreen.explain.cam import Explainer
from cxrscreen.explain.overlay import write_png
from cxrscreen.io.xray import read_xray
from cxrscreen.lungs.masks import draw_masks
from cxrscreen.lungs.segmenter import LungSegmenter
from cxrscreen.predict.predictor import Predictor, load_model
from cxrscreen.severity.scorer import SeverityScorer

ROOT = Path(__file__).resolve().parents[1]


def films(data: Path, n_cxr: int) -> list[tuple[Path, Path | None]]:
    """(image, opacity mask or None): the lesions films licensed CC BY, then `n_cxr` CC BY 4.0 COVID films."""
    les = pd.read_csv(data / "lesions" / "manifest.csv", dtype=str, keep_default_na=False)
    out: list[tuple[Path, Path | None]] = []
    for img in les[les["license"] == "CC BY"]["image"]:
        mask = data / "lesions" / "masks_opacity" / f"{Path(img).stem}.png"
        out.append((data / "lesions" / img, mask if mask.is_file() else None))
    cxr = pd.read_csv(data / "cxr" / "manifest.csv", dtype=str, keep_default_na=False)
    pick = cxr[(cxr["license"] == "CC BY 4.0") & (cxr["label"] == "covid")].sort_values("image").head(n_cxr)
    out += [(data / "cxr" / img, None) for img in pick["image"]]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    ap.add_argument("--cxr", type=int, default=2)
    args = ap.parse_args()
    run = load_model(None)
    seg = LungSegmenter.load()
    predictor = Predictor(run, severity=SeverityScorer.for_run(run))  # severity where the call is not normal
    explainer = Explainer(run, lungs=seg)
    for i, (path, opacity) in enumerate(films(args.data, args.cxr), start=1):
        xray = read_xray(path)
        img = draw_masks(xray.pixels, seg.segment(xray.pixels).mask)
        if opacity is not None:
            om = cv2.imread(str(opacity), cv2.IMREAD_GRAYSCALE) > 127
            contours, _ = cv2.findContours(om.astype("uint8"), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(img, contours, -1, (0, 0, 255), max(1, round(max(om.shape) / 300)))
        write_png(img, args.out / f"lungs_{i}.png")
        prep = predictor.prepare(xray)
        res = predictor.predict_prepared([prep])[0].to_dict()  # the drawer fills in heatmap_in_lungs
        explainer.write_overlay(prep, res, args.out, out_path=args.out / f"heatmap_{i}.png")
        print(f"{i}: {path.relative_to(args.data)} -> class {res['class']}, heat in lungs "
              f"{res['heatmap_in_lungs']}")


if __name__ == "__main__":
    main()
