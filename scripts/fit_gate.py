"""Fit the "not a frontal chest X-ray" gate and write src/cxrscreen/weights/gate.json.

The data recipe (the fit half of ../shared/data/cxr plus generated and scikit-image pictures; nothing is
downloaded, nothing is copied into the repository) lives in ``cxrscreen.gate.recipe``; the fit in
``cxrscreen.gate.fit.fit_gate_from_recipe``. Kinds never used for fitting (``UNSEEN_KINDS``) are reported
separately by benchmarks/gate_ood.py.

    .venv/bin/python scripts/fit_gate.py [--data ../shared/data/cxr] [--seed 0] [--out PATH]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = (REPO / ".." / "shared" / "data" / "cxr").resolve()
DEFAULT_OUT = REPO / "src" / "cxrscreen" / "weights" / "gate.json"


def main(argv: list[str] | None = None) -> int:
    """Fit on the fit half and the seen kinds; write the gate JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA_DIR)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-kind", type=int, default=40, help="generated images per seen kind")
    ap.add_argument("--c", type=float, default=0.1, help="inverse L2 penalty of the logistic regression")
    ap.add_argument("--components", type=int, default=2, help="Gaussian mixture components (novelty)")
    ap.add_argument("--real-accept", type=float, default=0.997,
                    help="out-of-fold fraction of X-rays each score's threshold accepts")
    ap.add_argument("--no-photometric", dest="photometric", action="store_false",
                    help="do not add a gamma / contrast / stretch copy of each X-ray")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)

    import cv2
    from threadpoolctl import threadpool_limits

    from cxrscreen.gate.fit import fit_gate_from_recipe

    cv2.setNumThreads(1)  # a small job: one core (BLAS too)
    threadpool_limits(1)
    gate = fit_gate_from_recipe(args.data, seed=args.seed, per_kind=args.per_kind, c=args.c,
                                components=args.components, real_accept=args.real_accept,
                                photometric=args.photometric)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    gate.to_json(args.out)
    print(f"wrote {args.out}: p_threshold {gate.p_threshold:.4f}, novelty_threshold "
          f"{gate.novelty_threshold:.2f}; {gate.info}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
