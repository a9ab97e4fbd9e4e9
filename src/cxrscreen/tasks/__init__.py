"""Tasks at inference: what each kind of model owns (see `tasks.base`); looked up by the kind a spec or run names.

Training each kind is `cxrscreen.training.tasks`; importing this package imports no training code. A kind's
module is imported when the kind is first asked for (the detector's pulls in torchvision; a classifier served by
ONNX Runtime needs neither torch nor torchvision).
"""

from __future__ import annotations

from importlib import import_module

from cxrscreen.errors import CXRError
from cxrscreen.tasks.base import Task

KINDS: dict[str, tuple[str, str]] = {
    "classifier": ("cxrscreen.tasks.classification", "ClassificationTask"),
    "detector": ("cxrscreen.tasks.detection", "DetectionTask"),
    "localizer": ("cxrscreen.tasks.detection", "DetectionTask"),  # the lung localizer: an SSD on lung boxes
}
_loaded: dict[str, Task] = {}


def task_for(kind: str) -> Task:
    """The inference task of a registry kind or a run's config.json "kind"."""
    if kind not in KINDS:
        raise CXRError(f"unknown model kind {kind!r}; known: {', '.join(sorted(KINDS))}")
    if kind not in _loaded:
        module, name = KINDS[kind]
        _loaded[kind] = getattr(import_module(module), name)()
    return _loaded[kind]


__all__ = ["KINDS", "Task", "task_for"]
