"""Screen PACS studies: query each study's instances, fetch the original frontal DX/CR images, predict, and
store an SR and a heatmap Secondary Capture back into the same study (`results.dicom`).

Idempotent: the SR and SC UIDs are derived from the source instance and the model (`results.dicom.
derived_uid`), so an instance whose SR is already in the study is neither fetched nor screened again, and a
second run stores nothing. A failing instance fails its study, which is reported; the other instances and
studies go on. Logs name studies by a hash of their UID (`client.study_tag`), never by patient data.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cxrscreen.errors import CXRError
from cxrscreen.io.dicom_identity import DX_SOP_CLASSES
from cxrscreen.pacs.client import InstanceRef, PacsClient, study_tag
from cxrscreen.results.dicom import MANUFACTURER, DicomWriter, ModelInfo, derived_uid


@dataclass
class StudyOutcome:
    """What screening one study did; `errors` are (instance number in the study, problem)."""

    study: str  # the study's tag (hash), not its UID
    screened: int = 0
    stored: int = 0
    already_done: int = 0
    other_instances: int = 0
    skipped: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        return {"study": self.study, "ok": self.ok, "screened": self.screened, "stored": self.stored,
                "already_done": self.already_done,
                "other_instances": self.other_instances, "skipped": self.skipped, "errors": self.errors,
                "seconds": {k: round(v, 4) for k, v in self.seconds.items()}}


class StudyScreener:
    """The model loaded once (predictor with its gate and decision rule, Grad-CAM explainer) and a PACS."""

    def __init__(self, run: Any, client: PacsClient, *, gate: Any = None, rule: Any = None) -> None:
        from cxrscreen.predict.predictor import Predictor

        self.run = run
        self.client = client
        self.model = ModelInfo.of_run(run)
        self.predictor = Predictor(run, batch_size=1, gate=gate, rule=rule)
        import highdicom.sc
        import highdicom.sr  # noqa: F401 (imported with the model, ~1 s: not on the first study's clock)

        self.explainer = None
        if run.task.has_logits and not getattr(run.model, "takes_numpy", False):
            from cxrscreen.explain.cam import Explainer

            self.explainer = Explainer(run)

    def _timed(self, out: StudyOutcome, key: str, fn: Callable[..., Any], *args: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            out.seconds[key] = out.seconds.get(key, 0.0) + time.perf_counter() - t0

    def screen(self, study: str) -> StudyOutcome:
        """Screen one study (see the module docstring); never raises for a bad instance or PACS error."""
        out = StudyOutcome(study=study_tag(study))
        try:
            refs = self._timed(out, "query", self.client.instances, study)
        except CXRError as exc:
            out.errors.append(exc.problem)
            return out
        present = {r.sop for r in refs}
        candidates = [r for r in refs if r.sop_class in DX_SOP_CLASSES]
        out.other_instances = len(refs) - len(candidates)  # SR, SC (ours among them), CT, ...: not screened
        for i, ref in enumerate(candidates, 1):
            if derived_uid(ref.sop, self.model.weights_sha256, "sr") in present:
                out.already_done += 1
                continue
            try:
                self._screen_instance(ref, out, i)
            except CXRError as exc:
                out.errors.append(f"instance {i}: {exc.problem}")
            except Exception as exc:  # a bug or an unexpected object must cost one instance, not the run
                out.errors.append(f"instance {i}: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}")
        return out

    def _screen_instance(self, ref: InstanceRef, out: StudyOutcome, i: int) -> None:
        from cxrscreen.io.xray import read_xray_bytes

        data = self._timed(out, "fetch", self.client.retrieve, ref)
        xray = self._timed(out, "decode", lambda: read_xray_bytes(data, name=f"{study_tag(ref.study)}/{i}.dcm"))
        if xray.dicom is None:
            raise CXRError("instance has no Study/SOP Instance UID")
        why = xray.dicom.screenable(MANUFACTURER)
        if why is not None:
            out.skipped.append(f"instance {i}: {why}")
            return
        prep = self.predictor.prepare(xray)
        result = self._timed(out, "predict", lambda: self.predictor.predict_prepared([prep])[0])
        if self.explainer is not None and result.probabilities and result.label is not None:
            result.heatmap_array = self._timed(out, "heatmap", self.explainer.heatmap, prep, result.label)
        writer = DicomWriter(self.run, self.client.store, pixels_of=lambda _: xray.pixels)
        writer.model = self.model
        self._timed(out, "build_and_store", writer.write, [result])
        if writer.errors:
            raise CXRError(writer.errors[0][1])
        out.screened += 1
        out.stored += sum(len(uids) for _, uids in writer.written)


def screen_studies(screener: StudyScreener, studies: list[str], report: Callable[[StudyOutcome], None]
                   ) -> list[StudyOutcome]:
    """Screen each study in turn, calling `report` after each; a failing study never stops the others."""
    outcomes = []
    for study in studies:
        outcome = screener.screen(study)
        report(outcome)
        outcomes.append(outcome)
    return outcomes
