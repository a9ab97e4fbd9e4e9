"""One decoded and preprocessed input, and how probabilities are printed: shared by the predictor, Grad-CAM
and the writers (a module of its own so that explanation does not import the predictor)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cxrscreen.io.xray import XRay
from cxrscreen.transforms.preprocess import Geometry


def format_probabilities(probs: dict[str, float]) -> str:
    """'covid 54.8 %, normal 27.0 %, pneumonia 18.2 %' as the study printed them."""
    return ", ".join(f"{c} {100 * p:.1f} %" for c, p in probs.items())


@dataclass
class Prepared:
    """One decoded and preprocessed input."""

    path: str
    xray: XRay
    image: np.ndarray
    geometry: Geometry
