"""Prediction on files, folders or uploaded bytes, with the bundled model or a run directory.

Each input yields one result dict: `path`, `class`, `probabilities{class: p}`, `decision` (the rule that
chose the class, see `cxrscreen.decision`), and where they apply
`error`, `flags`, `heatmap`, and for detectors `boxes` (list of {box: [x0, y0, x1, y1] in original
image pixels, label, class, score}; see `models.detection.result_boxes`). A bad file yields a result
with `error` set and the batch goes on. An input the gate flags gets `class` and `probabilities` None:
no output shows a diagnosis or the model's probabilities for it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxrscreen.decision import DecisionRule, decide_names
from cxrscreen.errors import CXRError
from cxrscreen.io import XRay, is_supported_file, read_xray
from cxrscreen.runs import LoadedRun, load_run
from cxrscreen.transforms import Geometry, Preprocessor, to_model_tensor


def default_model_dir() -> Path:
    """The folder of the model bundled inside the package."""
    return Path(str(resources.files("cxrscreen") / "weights"))


def load_model(model: str | Path | None = None, *, device: str = "cpu") -> LoadedRun:
    """A run directory, or the bundled default model when `model` is None."""
    path = default_model_dir() if model is None else Path(model)
    if model is None and not (path / "model.safetensors").is_file():
        raise CXRError("the bundled default model is missing from this installation; pass --model RUN_DIR", path)
    return load_run(path, device=device)


def iter_image_files(inputs: Iterable[str | Path]) -> Iterator[Path]:
    """Files as given, and the image files found recursively in folders (sorted)."""
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            yield from images_in_folder(p)
        else:
            yield p


def images_in_folder(folder: Path) -> list[Path]:
    """The image files under `folder`, recursively, sorted."""
    return [f for f in sorted(folder.rglob("*")) if f.is_file() and is_supported_file(f)]


@dataclass(frozen=True)
class ImageInput:
    """One file to predict and its label: the relative path that names its outputs (a file given alone:
    its name; a file found in a folder argument: the folder's name and the path inside it)."""

    path: Path
    label: Path


def collect_inputs(inputs: Iterable[str | Path]) -> tuple[list[ImageInput], list[Path]]:
    """(the files to predict, the folder arguments that hold no image file)."""
    files: list[ImageInput] = []
    empty: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = images_in_folder(p)
            if not found:
                empty.append(p)
            top = Path(p.resolve().name)
            files += [ImageInput(f, top / f.relative_to(p)) for f in found]
        else:
            files.append(ImageInput(p, Path(p.name or "input")))
    return files, empty


class OutputNames:
    """Unique output paths under one folder: `<folder>/<label's folders>/<stem>_<tag>.png`, mirroring each
    input's label; a path already handed out in this run gets `_2`, `_3`, ... before the tag."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._used: set[Path] = set()

    def path(self, label: Path, tag: str) -> Path:
        """A fresh path for `label`'s output `tag` (its folder is created)."""
        folder = self.root / label.parent
        stem = label.stem or "input"
        out, n = folder / f"{stem}_{tag}.png", 1
        while out in self._used:
            n += 1
            out = folder / f"{stem}_{n}_{tag}.png"
        self._used.add(out)
        folder.mkdir(parents=True, exist_ok=True)
        return out


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


class Predictor:
    """Runs a loaded model on X-rays: decode -> preprocess (the run's config) -> model -> probabilities."""

    def __init__(self, run: LoadedRun, *, batch_size: int = 32, gate: Any = None,
                 rule: DecisionRule | None = None) -> None:
        self.run = run
        self.rule = rule if rule is not None else run.decision_rule()
        self.batch_size = batch_size
        self.preprocess = Preprocessor(run.preprocess)
        self.gate = gate
        # a model without parameters (the ONNX Runtime engine, cxrscreen.onnx_engine) takes CPU tensors
        self.device = next(run.model.parameters(), torch.empty(0)).device

    def prepare(self, xray: XRay) -> Prepared:
        img, geom = self.preprocess(xray.pixels)
        return Prepared(path=xray.path, xray=xray, image=img, geometry=geom)

    @property
    def is_detector(self) -> bool:
        return self.run.config.get("kind") == "detector"

    @torch.no_grad()
    def probabilities(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """(N, C) calibrated probabilities of preprocessed uint8 images (detectors: their image rule)."""
        if self.is_detector:
            from cxrscreen.models.detection import detector_probabilities

            return detector_probabilities(self.run.model, np.stack(images), len(self.run.classes),
                                          batch_size=self.batch_size)
        x = torch.stack([to_model_tensor(im, self.run.preprocess) for im in images]).to(self.device)
        logits = self.run.model(x).float().cpu()
        return torch.softmax(logits / self.run.temperature, 1).numpy()

    def decide(self, probs: np.ndarray) -> str:
        """The predicted class of one probability row under this predictor's decision rule."""
        return decide_names(probs[None], self.run.classes, self.rule)[0]

    def _result(self, prep: Prepared, probs: np.ndarray) -> dict[str, Any]:
        res: dict[str, Any] = {
            "path": prep.path,
            "class": self.decide(probs),
            "probabilities": {c: float(p) for c, p in zip(self.run.classes, probs, strict=True)},
            "decision": self.rule.to_dict(),
            "error": None,
            "flags": [],
        }
        if self.gate is not None:
            flags = self.gate.flags(prep.xray, prep.image)
            if flags:
                res["flags"] = flags
                res["class"] = None  # no diagnosis for an input that is not a frontal chest X-ray
                res["probabilities"] = None  # nor the model's probabilities, which would read as one
        return res

    def result(self, prep: Prepared, probs: np.ndarray) -> dict[str, Any]:
        """The result dict of one prepared input from its probabilities (class, flags; see the module)."""
        return self._result(prep, probs)

    def predict_prepared(self, preps: Sequence[Prepared]) -> list[dict[str, Any]]:
        if not preps:
            return []
        # detectors: one detection pass gives the probabilities and the boxes
        if self.is_detector:
            from cxrscreen.models.detection import detect, image_probabilities, result_boxes

            dets = detect(self.run.model, [p.image for p in preps], batch_size=self.batch_size)
            results = []
            for p, pr, d in zip(preps, image_probabilities(dets, len(self.run.classes)), dets, strict=True):
                res = self._result(p, pr)
                # original image pixels; none for a flagged input (a labelled box reads as a diagnosis)
                res["boxes"] = [] if res["flags"] else result_boxes(d, p.geometry, self.run.classes)
                results.append(res)
            return results
        probs = self.probabilities([p.image for p in preps])
        return [self._result(p, pr) for p, pr in zip(preps, probs, strict=True)]

    def predict_xray(self, xray: XRay) -> dict[str, Any]:
        """Result for one decoded X-ray."""
        return self.predict_prepared([self.prepare(xray)])[0]

    def predict_files(self, files: Iterable[str | Path]) -> Iterator[tuple[dict[str, Any], Prepared | None]]:
        """(result, prepared input or None on error) per file, in order, batched; bad files never stop it."""
        batch: list[Prepared] = []
        pending: list[tuple[int, dict[str, Any] | Prepared]] = []
        for f in files:
            try:
                item: dict[str, Any] | Prepared = self.prepare(read_xray(f))
                batch.append(item)
            except CXRError as exc:
                item = {"path": str(f), "class": None, "probabilities": None, "error": exc.problem, "flags": []}
            pending.append((len(pending), item))
            if len(batch) >= self.batch_size:
                yield from self._flush(pending, batch)
                pending, batch = [], []
        yield from self._flush(pending, batch)

    def _flush(self, pending: list[tuple[int, Any]], batch: list[Prepared]) -> Iterator[tuple[dict, Prepared | None]]:
        results = iter(self.predict_prepared(batch))
        for _, item in pending:
            if isinstance(item, Prepared):
                yield next(results), item
            else:
                yield item, None
