"""The gate against distorted films (issue 21 item 9); prints one JSON object.

A fixed sample of real X-rays of ../shared/data/cxr (every k-th of the sorted manifest) is resized to
512 x 220 (a landscape squeeze) and to 300 x 512 (portrait); every real image of the set wider than 1.5
(web figures of wide films) is read as it is. For each, the bundled gate's flags and its squeeze measure
(`Gate.squeeze_drop`: the novelty minus the novelty of the image made square) are reported, with how many
of the squeezed films are refused and how many real images the squeeze rule would wrongly refuse.

    python benchmarks/gate_squeeze.py --n 200 > docs/results/gate_squeeze.json
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from PIL import Image

from cxrscreen.gate.model import SQUEEZE_MIN_ASPECT, SQUEEZE_NOVELTY_DROP, Gate, bundled_gate_path
from cxrscreen.io.xray import XRay, read_xray

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = (REPO / ".." / "shared" / "data" / "cxr").resolve()


def _resized(x: XRay, w: int, h: int) -> XRay:
    meta = {k: v for k, v in x.meta.items() if not k.startswith("original_")}
    return XRay(cv2.resize(x.pixels, (w, h), interpolation=cv2.INTER_AREA), x.path, {**meta, "width": w, "height": h})


def _entry(gate: Gate, x: XRay) -> dict:
    flags = gate.flags(x)
    drop = gate.squeeze_drop(x)
    return {"flags": flags, "squeeze_drop": None if drop is None else round(drop, 1),
            "squeeze_flagged": any(f.startswith("looks squeezed") for f in flags)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA_DIR)
    ap.add_argument("--n", type=int, default=31, help="real X-rays squeezed")
    args = ap.parse_args(argv)
    m = pd.read_csv(args.data / "manifest.csv", dtype=str, keep_default_na=False)
    m = m.sort_values("image").reset_index(drop=True)
    gate = Gate.from_json(bundled_gate_path())
    idx = np.linspace(0, len(m) - 1, args.n).round().astype(int)
    squeezed: dict[str, list] = {"original": [], "landscape_512x220": [], "portrait_300x512": []}
    for i in idx:
        x = read_xray(args.data / m["image"][i])
        for kind, y in (("original", x), ("landscape_512x220", _resized(x, 512, 220)),
                        ("portrait_300x512", _resized(x, 300, 512))):
            squeezed[kind].append({"image": m["image"][i], **_entry(gate, y)})
    wide = []
    for img in m["image"]:
        with Image.open(args.data / img) as im:
            w, h = im.size
        if w > SQUEEZE_MIN_ASPECT * h:
            wide.append({"image": img, "aspect": round(w / h, 2), **_entry(gate, read_xray(args.data / img))})

    def summary(rows: list[dict]) -> dict:
        drops = [r["squeeze_drop"] for r in rows if r["squeeze_drop"] is not None]
        return {"n": len(rows), "flagged": sum(bool(r["flags"]) for r in rows),
                "flagged_as_squeezed": sum(r["squeeze_flagged"] for r in rows),
                "squeeze_drop_min_max": [min(drops), max(drops)] if drops else None}

    print(json.dumps({
        "when": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "gate": str(bundled_gate_path().name), "squeeze_min_aspect": SQUEEZE_MIN_ASPECT,
        "squeeze_novelty_drop": SQUEEZE_NOVELTY_DROP,
        "note": "the threshold was chosen on these same images (no held-out set): the margin between real wide "
                "images and squeezed films is narrow",
        "summary": {**{k: summary(v) for k, v in squeezed.items()}, "real_wider_than_min_aspect": summary(wide)},
        "squeezed": squeezed, "real_wide": wide,
    }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
