"""Lung masking: the audited model on images with the lungs blacked out, and the verdicts that follow."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cxrscreen.data.lung_boxes import Box, LungBoxes, PixelBox
from cxrscreen.data.subsets import SubsetData, load_subset
from cxrscreen.evaluation.evaluate import run_probabilities
from cxrscreen.evaluation.metrics import classification_report
from cxrscreen.io.xray import read_xray
from cxrscreen.runs.decision import DecisionRule, decide
from cxrscreen.runs.run_dir import LoadedRun
from cxrscreen.transforms.boxes import boxes_to_model
from cxrscreen.transforms.cache import PreprocessedCache, default_cache_dir
from cxrscreen.transforms.preprocess import Geometry, Preprocessor

PARTS: tuple[str, ...] = ("per_source", "masking", "probe", "loso")
CONDITIONS: tuple[str, ...] = ("original", "lungs_masked", "lungs_only")
BOX_SUBSETS: tuple[str, ...] = ("all", "annotated", "atlas")
MIN_JUDGE_N = 20  # fewer images than this: no verdict


ATLAS_NOTE = (
    "Images without annotated lung boxes get atlas boxes: the mean right and left lung boxes of the "
    "annotated images, as fractions of the original image's width and height. Atlas boxes only "
    "roughly cover the lungs of any one image."
)


def pixel_boxes(geom: Geometry, boxes: Sequence[Box]) -> list[PixelBox]:
    """Original-pixel boxes -> model-pixel boxes [x0, x1) x [y0, y1): mapped and clipped by
    `transforms.boxes.boxes_to_model` (in float64), then widened to whole pixels.

    Boxes with no whole pixel inside the model input (e.g. cut off by a centre crop) are dropped.
    """
    mapped, _ = boxes_to_model(geom, np.asarray(boxes, np.float64), min_side=-math.inf, dtype=np.float64)
    out: list[PixelBox] = []
    for x0, y0, x1, y1 in mapped:
        ix0, iy0, ix1, iy1 = math.floor(x0), math.floor(y0), math.ceil(x1), math.ceil(y1)
        if ix1 > ix0 and iy1 > iy0:
            out.append((ix0, iy0, ix1, iy1))
    return out


def lung_mask(size: int, boxes: Sequence[PixelBox]) -> np.ndarray:
    """Boolean (size, size) map, True inside any box."""
    m = np.zeros((size, size), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        m[y0:y1, x0:x1] = True
    return m


def mask_image(img: np.ndarray, boxes: Sequence[PixelBox], condition: str) -> np.ndarray:
    """Copy of a preprocessed uint8 image with the lungs ("lungs_masked") or the rest ("lungs_only") at 0."""
    if condition == "original":
        return img.copy()
    m = lung_mask(img.shape[0], boxes)
    out = img.copy()
    if condition == "lungs_masked":
        out[m] = 0
    elif condition == "lungs_only":
        out[~m] = 0
    else:
        raise ValueError(f"unknown condition {condition!r}; use one of {', '.join(CONDITIONS)}")
    return out


@dataclass
class MaskingSet:
    """Test images with their geometry and lung boxes in model pixels."""

    data: SubsetData
    geometries: list[Geometry]
    boxes: list[list[PixelBox]]
    kinds: list[str]  # "annotated" or "atlas", per image

    def images(self, condition: str) -> np.ndarray:
        """All images under one condition (original / lungs_masked / lungs_only)."""
        out = self.data.images.copy()
        for i, b in enumerate(self.boxes):
            out[i] = mask_image(out[i], b, condition)
        return out


def masking_set(
    run: LoadedRun,
    data_dir: Path,
    split_csv: Path,
    lung_boxes: LungBoxes,
    *,
    subset: str = "test",
    cache_dir: Path | None = None,
) -> MaskingSet:
    """Load a subset (through the cache) and map each image's lung boxes into the model's input.

    Each file is decoded once more to get its Geometry (the cache stores pixels only).
    """
    cache = PreprocessedCache(run.preprocess, cache_dir if cache_dir is not None else default_cache_dir())
    data = load_subset(Path(data_dir), split_csv, subset, cache, run.classes)
    pre = Preprocessor(run.preprocess)
    geoms, boxes, kinds = [], [], []
    for path in data.paths:
        pixels = read_xray(path).pixels
        _, geom = pre(pixels)
        orig, kind = lung_boxes.boxes_for(path, pixels.shape)
        geoms.append(geom)
        boxes.append(pixel_boxes(geom, orig))
        kinds.append(kind)
    return MaskingSet(data=data, geometries=geoms, boxes=boxes, kinds=kinds)


# ------------------------------------------------------------------------------------------------ figures
def _chance(labels: np.ndarray) -> float | None:
    """Majority-class rate (accuracy of always answering the commonest class)."""
    return float(np.bincount(labels).max() / len(labels)) if len(labels) else None


def _summary(rep: dict[str, Any]) -> dict[str, Any]:
    """The figures the audit compares, from a classification_report (chance: majority-class rate)."""
    present = [c for c, d in rep["classes"].items() if d["support"] > 0]
    cvr = rep["covid_vs_rest"]
    return {
        "n": rep["n"],
        "chance": max(d["support"] for d in rep["classes"].values()) / rep["n"] if rep["n"] else None,
        "accuracy": rep["accuracy"],
        "macro_f1": rep["macro_f1"],
        "recall": {c: rep["classes"][c]["recall"] for c in present},
        "support": {c: rep["classes"][c]["support"] for c in present},
        "covid_sensitivity": cvr["sensitivity"],
        "covid_specificity": cvr["specificity"],
        "covid_auc": cvr["auc"],
    }


def _figures(
    labels: np.ndarray,
    probs: np.ndarray,
    groups: list[str],
    sources: list[str],
    classes: list[str],
    *,
    n_boot: int,
    seed: int,
    threshold: float | None = None,
) -> dict[str, Any]:
    """Summary figures of one condition; classes decided as `predict` decides them (threshold: the run's)."""
    rep = classification_report(labels, probs, groups, classes, threshold=threshold, n_boot=n_boot, seed=seed)
    out = _summary(rep)
    pred = decide(probs, classes, DecisionRule(threshold=threshold))
    src = np.asarray(sources)
    out["per_source_accuracy"] = {s: float((pred[src == s] == labels[src == s]).mean()) for s in sorted(set(sources))}
    out["predicted"] = {c: int((pred == k).sum()) for k, c in enumerate(classes)}
    return out


def covid_signal_verdict(masked_auc: dict[str, Any], n: int) -> tuple[bool | None, str]:
    """(flag, sentence): flagged when COVID-vs-rest AUC with the lungs masked is >= 0.7 (and its 95 % CI
    lower bound >= 0.6): the covid ranking survives without the lungs, whatever the arg-max accuracy."""
    auc, ci = masked_auc.get("value"), masked_auc.get("ci95")
    if auc is None or n < MIN_JUDGE_N:
        return None, "COVID AUC with the lungs masked cannot be judged here"
    if auc >= 0.7 and (ci is None or ci[0] >= 0.6):
        return True, (
            f"with the lungs masked the COVID-vs-rest AUC is still {auc:.2f}: the model ranks covid above "
            "the rest from what lies outside the lung boxes (atlas boxes may leave lung edges visible)"
        )
    return False, f"with the lungs masked the COVID-vs-rest AUC is {auc:.2f}, below the 0.7 mark"


def _collapse_note(fig: dict[str, Any]) -> str | None:
    """A sentence when >= 90 % of predictions fall in one class (masking pushed the model off its inputs)."""
    total = sum(fig["predicted"].values())
    cls, count = max(fig["predicted"].items(), key=lambda kv: kv[1])
    if not total or count / total < 0.9:
        return None
    return (
        f"with the lungs masked the model answers {cls} for {count / total:.0%} of images: the black boxes, "
        "unlike any training image, push it to one class, so accuracy near chance alone does not prove it "
        "reads the lungs"
    )


def shortcut_verdict(original: float, masked: float, chance: float, n: int) -> tuple[bool | None, str]:
    """(flag, sentence): flagged when lungs-masked accuracy stays at least 0.1 above chance and either
    exceeds 0.6 or stays within 0.1 of the unmasked accuracy. None when n < MIN_JUDGE_N or when the
    unmasked model is itself within 0.1 of chance (nothing to lose)."""
    if n < MIN_JUDGE_N:
        return None, f"only {n} images: too few to judge"
    if original - chance < 0.1:
        return None, (
            f"the unmasked model scores {original:.2f}, near chance ({chance:.2f}): with no accuracy to "
            "lose, masking cannot tell what it reads"
        )
    above = masked - chance >= 0.1
    if above and (masked > 0.6 or masked >= original - 0.1):
        return True, (
            f"with the lungs blacked out the model still scores {masked:.2f} (unmasked {original:.2f}, "
            f"chance {chance:.2f}): it reads something outside the lungs"
        )
    if above:
        return False, (
            f"with the lungs blacked out accuracy falls from {original:.2f} to {masked:.2f}, still above "
            f"chance ({chance:.2f}) but not by enough to call a shortcut"
        )
    return False, (
        f"with the lungs blacked out accuracy falls from {original:.2f} to {masked:.2f}, near chance "
        f"({chance:.2f}): by accuracy, the model needs the lungs"
    )


def masking_report(run: LoadedRun, ms: MaskingSet, *, n_boot: int, seed: int) -> dict[str, Any]:
    """Figures per condition and per box kind, with shortcut verdicts."""
    d = ms.data
    probs = {c: run_probabilities(run, ms.images(c)) for c in CONDITIONS}
    kinds = np.asarray(ms.kinds)
    subsets: dict[str, Any] = {}
    for name in BOX_SUBSETS:
        m = np.ones(len(kinds), bool) if name == "all" else kinds == name
        if not m.any():
            subsets[name] = {"n": 0}
            continue
        groups = [g for g, k in zip(d.groups, m, strict=True) if k]
        sources = [s for s, k in zip(d.sources, m, strict=True) if k]
        entry: dict[str, Any] = {
            "n": int(m.sum()),
            "chance": _chance(d.labels[m]),
            "sources": {s: sources.count(s) for s in sorted(set(sources))},
        }
        for c in CONDITIONS:
            entry[c] = _figures(d.labels[m], probs[c][m], groups, sources, run.classes, n_boot=n_boot, seed=seed,
                                threshold=run.decision_rule().threshold)
        flag, why = shortcut_verdict(
            entry["original"]["accuracy"], entry["lungs_masked"]["accuracy"], entry["chance"], entry["n"]
        )
        entry["shortcut_flag"], entry["finding"] = flag, why
        entry["covid_signal_outside_lungs"], entry["covid_finding"] = covid_signal_verdict(
            entry["lungs_masked"]["covid_auc"], entry["n"]
        )
        entry["collapse_note"] = _collapse_note(entry["lungs_masked"])
        subsets[name] = entry
    flags = [subsets[s].get("shortcut_flag") for s in BOX_SUBSETS]
    overall = True if True in flags else (False if False in flags else None)
    flagged = [s for s in BOX_SUBSETS if subsets[s].get("shortcut_flag")]
    covid = subsets["all"].get("covid_signal_outside_lungs")
    if overall:
        finding = (
            f"Shortcut: the model stays accurate with the lungs blacked out ({', '.join(flagged)} "
            "boxes). It reads something outside the lungs: borders, text, markers, the hospital's look."
        )
    elif overall is False:
        finding = "No shortcut flagged by masking: blacking out the lungs costs the model most of its accuracy."
    else:
        finding = f"Masking test inconclusive: {subsets['all'].get('finding', 'no test images')}."
    if subsets["all"].get("collapse_note"):
        finding += f" But {subsets['all']['collapse_note']}."
    if covid:
        finding += f" Also, {subsets['all']['covid_finding']}."
    return {
        "n_annotated": int((kinds == "annotated").sum()),
        "n_atlas": int((kinds == "atlas").sum()),
        "box_note": ATLAS_NOTE,
        "subsets": subsets,
        "shortcut_flag": overall,
        "covid_signal_outside_lungs": covid,
        "finding": finding,
    }

