"""Prediction on files, folders or uploaded bytes, with the bundled model or a run directory.

Each input yields one typed result (`results.result.PredictionResult`): its path, class, probabilities,
the decision rule that chose the class (see `runs.decision`), the gate's flags, an error, severity, the
source's DICOM identity and the task's own fields in `extra` (detectors: "boxes", a list of {box: [x0, y0,
x1, y1] in original image pixels, label, class, score}; see `models.detection.result_boxes`). A bad file
yields a result with `error` set (`PredictionResult.failed`) and the batch goes on. An input the gate flags
has class and probabilities None (`PredictionResult.withhold`): no output shows a diagnosis or the model's
probabilities for it. With a severity scorer (`cxrscreen.severity.scorer`) each result also has `severity`
(None for a normal call or a flagged input).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from cxrscreen.errors import CXRError
from cxrscreen.io.xray import XRay, read_xray
from cxrscreen.predict.prepared import Prepared
from cxrscreen.results.result import PredictionResult
from cxrscreen.runs.decision import DecisionRule, decide_names
from cxrscreen.runs.run_dir import LoadedRun, load_run
from cxrscreen.transforms.preprocess import Preprocessor

FREEZE_MIN_IMAGES = 64  # fewer inputs keep the eager model: tracing (about 1 s idle, 4 s busy) would not pay


def default_model_dir() -> Path:
    """The folder of the model bundled inside the package."""
    return Path(str(resources.files("cxrscreen") / "weights"))


def load_model(model: str | Path | None = None, *, device: str = "cpu") -> LoadedRun:
    """A run directory, or the bundled default model when `model` is None."""
    path = default_model_dir() if model is None else Path(model)
    if model is None and not (path / "model.safetensors").is_file():
        raise CXRError("the bundled default model is missing from this installation; pass --model RUN_DIR", path)
    return load_run(path, device=device)


class Predictor:
    """Runs a loaded model on X-rays: decode -> preprocess (the run's config) -> model -> probabilities."""

    def __init__(self, run: LoadedRun, *, batch_size: int = 32, gate: Any = None,
                 rule: DecisionRule | None = None, severity: Any = None) -> None:
        self.run = run
        self.severity = severity  # a severity.SeverityScorer: fills the result's severity (issue 13)
        self.rule = rule if rule is not None else run.decision_rule()
        self.batch_size = batch_size
        self.preprocess = Preprocessor(run.preprocess)
        self.gate = gate

    def expect(self, n_inputs: int) -> bool:
        """Say how many inputs follow. From `FREEZE_MIN_IMAGES` on, a torch classifier computes its logits with
        a frozen TorchScript graph (`LoadedRun.with_frozen_graph`: same logits within 1e-3, about 1.4x as fast on
        the CPU); other predictors of the same run are unaffected. True when the frozen graph is in use."""
        if n_inputs >= FREEZE_MIN_IMAGES:
            self.run = self.run.with_frozen_graph()
        return getattr(self.run, "frozen", None) is not None

    def prepare(self, xray: XRay) -> Prepared:
        img, geom = self.preprocess(xray.pixels)
        return Prepared(path=xray.path, xray=xray, image=img, geometry=geom)

    def probabilities(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """(N, C) calibrated probabilities of preprocessed uint8 images (by the run's task)."""
        return self.run.task.outputs(self.run, images, batch_size=self.batch_size)[0]

    def outputs(self, preps: Sequence[Prepared]) -> list[tuple[np.ndarray, dict[str, Any]]]:
        """(probabilities, task result fields) per prepared input: one model pass for the batch."""
        probs, extra = self.run.task.outputs(self.run, [p.image for p in preps], [p.geometry for p in preps],
                                             batch_size=self.batch_size)
        return list(zip(probs, extra, strict=True))

    def decide(self, probs: np.ndarray) -> str:
        """The predicted class of one probability row under this predictor's decision rule."""
        return decide_names(probs[None], self.run.classes, self.rule)[0]

    def result(self, prep: Prepared, probs: np.ndarray, extra: dict[str, Any] | None = None,
               flags: list[str] | None = None) -> PredictionResult:
        """The result of one prepared input from its probabilities and the task's result fields (detectors:
        "boxes", in original pixels; emptied for a flagged input: a labelled box reads as a diagnosis).
        `flags`: the gate's, when already computed for the batch."""
        res = PredictionResult(
            path=prep.path, label=self.decide(probs),
            probabilities={c: float(p) for c, p in zip(self.run.classes, probs, strict=True)},
            decision=self.rule.to_dict(), dicom=getattr(prep.xray, "dicom", None), extra=dict(extra or {}))
        if self.gate is not None:
            # not a frontal chest X-ray: no diagnosis
            res.withhold(self.gate.flags(prep.xray) if flags is None else flags)
        if self.severity is not None:  # None for a normal call or a flagged image
            res.severity = self.severity.score(prep.xray) if self.severity.applies(res.to_dict()) else None
            res.severity_scored = True
        return res

    def predict_prepared(self, preps: Sequence[Prepared]) -> list[PredictionResult]:
        """Results of prepared inputs, in order: one model pass for the batch."""
        if not preps:
            return []
        many = getattr(self.gate, "flags_many", None)  # the gate's lungs rule segments the batch at once
        flags = many([p.xray for p in preps]) if many is not None else [None] * len(preps)
        return [self.result(p, pr, ex, fl) for p, (pr, ex), fl in zip(preps, self.outputs(preps), flags, strict=True)]

    def predict_xray(self, xray: XRay) -> PredictionResult:
        """Result for one decoded X-ray."""
        return self.predict_prepared([self.prepare(xray)])[0]

    def predict_files(self, files: Iterable[str | Path]) -> Iterator[tuple[PredictionResult, Prepared | None]]:
        """(result, prepared input or None on error) per file, in order, batched; bad files never stop it. Files
        are read and preprocessed by a reader thread up to one batch ahead of the model
        (`predict.inputs.read_ahead`)."""
        from cxrscreen.predict.inputs import read_ahead

        batch: list[Prepared] = []
        pending: list[PredictionResult | Prepared] = []
        for f, read in read_ahead(files, lambda f: self.prepare(read_xray(f)), depth=self.batch_size):
            if isinstance(read, Prepared):
                item: PredictionResult | Prepared = read
                batch.append(item)
            else:
                item = PredictionResult.failed(f, read.problem)
            pending.append(item)
            if len(batch) >= self.batch_size:
                yield from self._flush(pending, batch)
                pending, batch = [], []
        yield from self._flush(pending, batch)

    def _flush(self, pending: list[PredictionResult | Prepared], batch: list[Prepared]
               ) -> Iterator[tuple[PredictionResult, Prepared | None]]:
        results = iter(self.predict_prepared(batch))
        for item in pending:
            if isinstance(item, Prepared):
                yield next(results), item
            else:
                yield item, None
