"""Tasks at inference: what each kind of model owns (see `tasks.base`); looked up by the kind a spec or run names.

Training each kind is `cxrscreen.training.tasks`; importing this package imports no training code.
"""

from __future__ import annotations

from cxrscreen.errors import CXRError
from cxrscreen.tasks.base import Task
from cxrscreen.tasks.classification import ClassificationTask
from cxrscreen.tasks.detection import DetectionTask

TASKS: dict[str, Task] = {
    "classifier": ClassificationTask(),
    "detector": DetectionTask(),
    "localizer": DetectionTask(),  # the lung localizer's run directory: an SSD on right / left lung boxes
}


def task_for(kind: str) -> Task:
    """The inference task of a registry kind or a run's config.json "kind"."""
    try:
        return TASKS[kind]
    except KeyError:
        raise CXRError(f"unknown model kind {kind!r}; known: {', '.join(sorted(TASKS))}") from None


__all__ = ["TASKS", "Task", "task_for"]
