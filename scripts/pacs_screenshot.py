"""The README's picture of the heatmap Secondary Capture: one real chest X-ray of ../shared/data/cxr made into a
12-bit MONOCHROME1 DX file, `cxrscreen predict FILE.dcm --dicom-out DIR`, and the SC's pixels as written
(what a viewer shows) saved as a PNG.

    python scripts/pacs_screenshot.py [--image images/cohen/NAME.jpg] [--out docs/screenshots/pacs_sc_overlay.png]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pydicom

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / ".." / "shared" / "data" / "cxr"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--image", default="images/cohen/000001-19.jpg", help="path inside ../shared/data/cxr")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "screenshots" / "pacs_sc_overlay.png")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from tests.dicom_fixtures import write_dx

    pixels = cv2.imread(str(DATA / args.image), cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255.0
    with tempfile.TemporaryDirectory() as tmp:
        dx = write_dx(Path(tmp) / "chest.dcm", pixels, monochrome1=True)
        subprocess.run([sys.executable, "-m", "cxrscreen.cli", "predict", str(dx), "--dicom-out",
                        str(Path(tmp) / "out")], check=True)
        sc = next(ds for p in (Path(tmp) / "out").iterdir() if (ds := pydicom.dcmread(p)).Modality == "OT")
        rgb = sc.pixel_array
    args.out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(args.out), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    print(args.out)


if __name__ == "__main__":
    main()
