"""One typed prediction result, built by the predictor and written by every writer.

Fields: `path`, `label` (the class the decision rule chose; None for an error or an input the gate
flagged), `probabilities` ({class: p}, None when withheld), `decision` (the rule: see
`runs.decision.DecisionRule.to_dict`), `flags` (the gate's reasons), `error`, `severity`,
`heatmap` (the PNG written, if any), `heatmap_array` (Grad-CAM on the original image grid, float32 (H, W)
in [0, 1], never serialised), `picture` (the task drawer's picture when one was drawn, BGR uint8
(H', W', 3): the DICOM Secondary Capture reuses it; never serialised), `dicom` (the source's
`io.dicom_identity.DicomIdentity` for DICOM inputs) and `extra` (other task fields, e.g. a detector's
"boxes"). `to_dict` gives the JSON shape the CLI always printed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cxrscreen.io.dicom_identity import DicomIdentity

_KNOWN = ("path", "class", "probabilities", "decision", "flags", "error", "severity", "heatmap", "heatmap_in_lungs",
          "dicom")


@dataclass
class PredictionResult:
    """One input's result (see the module docstring)."""

    path: str
    label: str | None = None
    probabilities: dict[str, float] | None = None
    decision: dict[str, Any] | None = None
    flags: list[str] = field(default_factory=list)
    error: str | None = None
    severity: dict[str, Any] | None = None
    severity_scored: bool = False  # a scorer ran (JSON then has "severity", null for a normal call)
    heatmap: str | None = None
    heatmap_in_lungs: float | None = None  # share of the heatmap's mass inside the segmented lungs, 0-1
    heatmap_array: np.ndarray | None = field(default=None, repr=False)
    picture: np.ndarray | None = field(default=None, repr=False)  # the drawer's BGR picture (see above)
    dicom: DicomIdentity | None = field(default=None, repr=False)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def withheld(self) -> bool:
        """True when the gate flagged the input: no class and no probabilities are shown."""
        return self.error is None and self.probabilities is None and bool(self.flags)

    @classmethod
    def failed(cls, path: str | Any, error: str) -> PredictionResult:
        """The result (the error row) of an input that could not be read or predicted: the one place it is
        made, for the CLI, batch screening and the PACS command alike."""
        return cls(path=str(path), error=error)

    def withhold(self, flags: list[str]) -> PredictionResult:
        """The gate flagged the input (`flags`: its reasons): no class, no probabilities and no task fields
        (a detector's labelled boxes read as a diagnosis too). The one place the gate's withholding is
        written. Returns self."""
        if flags:
            self.flags = list(flags)
            self.label = None
            self.probabilities = None
            self.extra = {k: [] for k in self.extra}
        return self

    @classmethod
    def from_dict(cls, res: dict[str, Any], *, dicom: DicomIdentity | None = None,
                  heatmap_array: np.ndarray | None = None) -> PredictionResult:
        """From a result's JSON object (`to_dict`'s shape: a JSONL row, the server's answer); unknown keys go to
        `extra`."""
        probs = res.get("probabilities")
        return cls(path=str(res["path"]), label=res.get("class"),
                   probabilities=None if probs is None else {k: float(v) for k, v in probs.items()},
                   decision=res.get("decision"), flags=list(res.get("flags") or []), error=res.get("error"),
                   severity=res.get("severity"), severity_scored="severity" in res, heatmap=res.get("heatmap"),
                   heatmap_in_lungs=res.get("heatmap_in_lungs"), heatmap_array=heatmap_array,
                   dicom=dicom, extra={k: v for k, v in res.items() if k not in _KNOWN})

    def to_dict(self, *, identity: bool = True) -> dict[str, Any]:
        """The JSON object of this result; `dicom` (UIDs only) for a DICOM input unless `identity` is False
        (the server's answer has no such key)."""
        out: dict[str, Any] = {"path": self.path, "class": self.label, "probabilities": self.probabilities}
        if self.decision is not None:
            out["decision"] = self.decision
        out["error"] = self.error
        out["flags"] = list(self.flags)
        out.update(self.extra)
        if self.severity is not None or self.severity_scored:
            out["severity"] = self.severity
        if self.heatmap is not None:
            out["heatmap"] = self.heatmap
        if self.heatmap_in_lungs is not None:
            out["heatmap_in_lungs"] = self.heatmap_in_lungs
        if identity and self.dicom is not None:
            out["dicom"] = self.dicom.to_dict()
        return out
