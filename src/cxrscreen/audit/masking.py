"""Lung masking: the audited model on images with the lungs blacked out, and the verdicts that follow.

The lungs are the bundled segmenter's masks (`lung_source="segmenter"`, the default), mapped onto the model's
input and dilated by SEGMENT_MARGIN of its side, or the lung boxes (`"boxes"`: COCO annotations, else the
atlas). With the segmenter the boxes' figures are computed on the same images as well, and the report compares
the two."""

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
from cxrscreen.lungs.masks import dilate, mask_to_model
from cxrscreen.runs.decision import DecisionRule, decide
from cxrscreen.runs.run_dir import LoadedRun
from cxrscreen.transforms.boxes import boxes_to_model
from cxrscreen.transforms.cache import PreprocessedCache, default_cache_dir
from cxrscreen.transforms.preprocess import Geometry, Preprocessor

PARTS: tuple[str, ...] = ("per_source", "masking", "probe", "loso")
CONDITIONS: tuple[str, ...] = ("original", "lungs_masked", "lungs_only")
BOX_SUBSETS: tuple[str, ...] = ("all", "annotated", "atlas")
MIN_JUDGE_N = 20  # fewer images than this: no verdict
LUNG_SOURCES: tuple[str, ...] = ("segmenter", "boxes")
SEGMENT_MARGIN = 0.02  # segmented lungs are dilated by this fraction of the model input's side (at least 1 px)
REGION_WORDS: dict[str, str] = {"segmenter": "segmented lungs", "boxes": "lung boxes"}


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


def segmented_region(label_map: np.ndarray, geom: Geometry, margin: float = SEGMENT_MARGIN) -> np.ndarray:
    """Boolean (size, size) map of the model input: a lung label map at the original size (0 / 1 / 2) moved
    onto the model's grid and dilated by `margin` x size pixels (rounded, at least 1)."""
    lungs = mask_to_model((np.asarray(label_map) > 0).astype(np.uint8), geom) > 0
    return dilate(lungs, margin_px(geom.size, margin))


def margin_px(size: int, margin: float = SEGMENT_MARGIN) -> int:
    """The dilation radius in model pixels for a model input of side `size`."""
    return max(1, round(margin * size))


def mask_image(img: np.ndarray, boxes: Sequence[PixelBox], condition: str) -> np.ndarray:
    """Copy of a preprocessed uint8 image with the lung boxes ("lungs_masked") or the rest ("lungs_only") at 0."""
    return apply_region(img, lung_mask(img.shape[0], boxes), condition)


def apply_region(img: np.ndarray, m: np.ndarray, condition: str) -> np.ndarray:
    """Copy of a preprocessed uint8 image with the lung region `m` (boolean, same shape; "lungs_masked") or
    the rest ("lungs_only") at 0; "original" gives an unchanged copy."""
    if condition == "original":
        return img.copy()
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
    """Test images with their geometry, lung boxes in model pixels and (segmenter) segmented lung regions."""

    data: SubsetData
    geometries: list[Geometry]
    boxes: list[list[PixelBox]]
    kinds: list[str]  # "annotated" or "atlas", per image
    segmented: list[np.ndarray] | None = None  # boolean (size, size) per image, dilated; None: boxes only
    lung_source: str = "boxes"  # which region the main figures use

    def sources(self) -> list[str]:
        """The lung sources this set can mask with, the main one first."""
        return [self.lung_source] + [s for s in LUNG_SOURCES if s != self.lung_source and self.has(s)]

    def has(self, source: str) -> bool:
        return source == "boxes" or (source == "segmenter" and self.segmented is not None)

    def region(self, i: int, source: str | None = None) -> np.ndarray:
        """Image i's lung region (boolean, model pixels) from `source` (default: the set's lung_source)."""
        source = source or self.lung_source
        if source == "boxes":
            return lung_mask(self.data.images.shape[1], self.boxes[i])
        if source == "segmenter" and self.segmented is not None:
            return self.segmented[i]
        raise ValueError(f"no {source!r} lungs in this masking set; use one of {', '.join(self.sources())}")

    def image(self, i: int, condition: str, source: str | None = None) -> np.ndarray:
        """Image i under one condition with the lungs of `source` (default: the set's lung_source)."""
        return apply_region(self.data.images[i], self.region(i, source), condition)

    def images(self, condition: str, source: str | None = None) -> np.ndarray:
        """All images under one condition (original / lungs_masked / lungs_only), lungs from `source`."""
        out = self.data.images.copy()
        if condition == "original":
            return out
        for i in range(len(out)):
            out[i] = self.image(i, condition, source)
        return out


def masking_set(
    run: LoadedRun,
    data_dir: Path,
    split_csv: Path,
    lung_boxes: LungBoxes,
    *,
    subset: str = "test",
    cache_dir: Path | None = None,
    lung_source: str = "segmenter",
    segmenter: Any | None = None,
    margin: float = SEGMENT_MARGIN,
) -> MaskingSet:
    """Load a subset (through the cache) and map each image's lung boxes into the model's input; with
    `lung_source="segmenter"` also segment each image's lungs (`segmenter`, default the bundled LungSegmenter)
    and keep them, dilated by `margin` of the input's side, as the main lung region.

    Each file is decoded once more to get its Geometry (the cache stores pixels only).
    """
    if lung_source not in LUNG_SOURCES:
        raise ValueError(f"unknown lung_source {lung_source!r}; use one of {', '.join(LUNG_SOURCES)}")
    if lung_source == "segmenter" and segmenter is None:
        from cxrscreen.lungs.segmenter import bundled_segmenter

        segmenter = bundled_segmenter()
    cache = PreprocessedCache(run.preprocess, cache_dir if cache_dir is not None else default_cache_dir())
    data = load_subset(Path(data_dir), split_csv, subset, cache, run.classes)
    pre = Preprocessor(run.preprocess)
    geoms, boxes, kinds, segmented = [], [], [], []
    for path in data.paths:
        pixels = read_xray(path).pixels
        _, geom = pre(pixels)
        orig, kind = lung_boxes.boxes_for(path, pixels.shape)
        geoms.append(geom)
        boxes.append(pixel_boxes(geom, orig))
        kinds.append(kind)
        if segmenter is not None:
            segmented.append(segmented_region(segmenter.segment(pixels).mask, geom, margin))
    return MaskingSet(data=data, geometries=geoms, boxes=boxes, kinds=kinds,
                      segmented=segmented if segmenter is not None else None, lung_source=lung_source)


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


def covid_signal_verdict(masked_auc: dict[str, Any], n: int, source: str = "boxes") -> tuple[bool | None, str]:
    """(flag, sentence): flagged when COVID-vs-rest AUC with the lungs masked is >= 0.7 (and its 95 % CI
    lower bound >= 0.6): the covid ranking survives without the lungs, whatever the arg-max accuracy."""
    auc, ci = masked_auc.get("value"), masked_auc.get("ci95")
    if auc is None or n < MIN_JUDGE_N:
        return None, "COVID AUC with the lungs masked cannot be judged here"
    if auc >= 0.7 and (ci is None or ci[0] >= 0.6):
        return True, (
            f"with the lungs masked the COVID-vs-rest AUC is still {auc:.2f}: the model ranks covid above "
            f"the rest from what lies outside the {REGION_WORDS[source]}"
            + (" (atlas boxes may leave lung edges visible)" if source == "boxes" else "")
        )
    return False, f"with the lungs masked the COVID-vs-rest AUC is {auc:.2f}, below the 0.7 mark"


def _collapse_note(fig: dict[str, Any], source: str = "boxes") -> str | None:
    """A sentence when >= 90 % of predictions fall in one class (masking pushed the model off its inputs)."""
    total = sum(fig["predicted"].values())
    cls, count = max(fig["predicted"].items(), key=lambda kv: kv[1])
    if not total or count / total < 0.9:
        return None
    return (
        f"with the lungs masked the model answers {cls} for {count / total:.0%} of images: the black "
        f"{'boxes' if source == 'boxes' else 'lung shapes'}, "
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


def _source_report(run: LoadedRun, ms: MaskingSet, source: str, original: np.ndarray, *, n_boot: int,
                   seed: int) -> dict[str, Any]:
    """Figures per condition and per box kind with the lungs of one `source`, with shortcut verdicts.
    `original`: the probabilities of the unmasked images (shared by every source)."""
    d = ms.data
    probs = {"original": original, **{c: run_probabilities(run, ms.images(c, source)) for c in CONDITIONS[1:]}}
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
            entry["lungs_masked"]["covid_auc"], entry["n"], source
        )
        entry["collapse_note"] = _collapse_note(entry["lungs_masked"], source)
        subsets[name] = entry
    flags = [subsets[s].get("shortcut_flag") for s in BOX_SUBSETS]
    overall = True if True in flags else (False if False in flags else None)
    flagged = [s for s in BOX_SUBSETS if subsets[s].get("shortcut_flag")]
    covid = subsets["all"].get("covid_signal_outside_lungs")
    if overall:
        finding = (
            f"Shortcut: the model stays accurate with the {REGION_WORDS[source]} blacked out ({', '.join(flagged)} "
            "box-kind images). It reads something outside the lungs: borders, text, markers, the hospital's look."
        )
    elif overall is False:
        finding = (f"No shortcut flagged by masking ({REGION_WORDS[source]}): blacking out the lungs costs the "
                   "model most of its accuracy.")
    else:
        finding = f"Masking test inconclusive: {subsets['all'].get('finding', 'no test images')}."
    if subsets["all"].get("collapse_note"):
        finding += f" But {subsets['all']['collapse_note']}."
    if covid:
        finding += f" Also, {subsets['all']['covid_finding']}."
    coverage = [float(ms.region(i, source).mean()) for i in range(len(kinds))]
    return {
        "lung_source": source,
        "mean_coverage": float(np.mean(coverage)) if coverage else None,
        "subsets": subsets,
        "shortcut_flag": overall,
        "covid_signal_outside_lungs": covid,
        "finding": finding,
    }


def _delta(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else float(a - b)


def compare_sources(seg: dict[str, Any], box: dict[str, Any]) -> dict[str, Any]:
    """Segmented minus boxes, on the "all" subset: COVID AUC and accuracy per masked condition, the share of
    the input each covers, and a finding sentence."""
    a, b = seg["subsets"]["all"], box["subsets"]["all"]
    out: dict[str, Any] = {"mean_coverage": {"segmented": seg["mean_coverage"], "boxes": box["mean_coverage"]}}
    if not a.get("n"):
        out["finding"] = "No test images: the segmented lungs and the boxes cannot be compared."
        return out
    for c in CONDITIONS[1:]:
        sa, ba = a[c]["covid_auc"].get("value"), b[c]["covid_auc"].get("value")
        out[c] = {"covid_auc": {"segmented": sa, "boxes": ba, "difference": _delta(sa, ba)},
                  "accuracy": {"segmented": a[c]["accuracy"], "boxes": b[c]["accuracy"],
                               "difference": _delta(a[c]["accuracy"], b[c]["accuracy"])}}
    m = out["lungs_masked"]
    auc = m["covid_auc"]
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    dif = "" if auc["difference"] is None else f", {auc['difference']:+.2f}"
    out["finding"] = (
        f"With segmented lungs instead of lung boxes, the lungs-masked COVID-vs-rest AUC is {fmt(auc['segmented'])} "
        f"against {fmt(auc['boxes'])} with boxes{dif}, and accuracy {fmt(m['accuracy']['segmented'])} against "
        f"{fmt(m['accuracy']['boxes'])}; the segmented lungs (dilated) cover {seg['mean_coverage']:.0%} of the "
        f"model input, the boxes {box['mean_coverage']:.0%}."
    )
    return out


def masking_report(run: LoadedRun, ms: MaskingSet, *, n_boot: int, seed: int) -> dict[str, Any]:
    """Figures per condition and per box kind with the set's main lungs (ms.lung_source), with shortcut
    verdicts; when the set holds segmented lungs, also "segmented" and "boxes" (each source's full figures on
    the same images) and "comparison" (segmented minus boxes, with a finding appended to the main one)."""
    original = run_probabilities(run, ms.images("original"))
    reports = {s: _source_report(run, ms, s, original, n_boot=n_boot, seed=seed) for s in ms.sources()}
    kinds = np.asarray(ms.kinds)
    out: dict[str, Any] = {
        "n_annotated": int((kinds == "annotated").sum()),
        "n_atlas": int((kinds == "atlas").sum()),
        "box_note": ATLAS_NOTE,
        **reports[ms.lung_source],
    }
    if ms.segmented is not None:
        out["segment_note"] = SEGMENT_NOTE.format(pct=SEGMENT_MARGIN)
        out["segmented"], out["boxes"] = reports["segmenter"], reports["boxes"]
        out["comparison"] = compare_sources(reports["segmenter"], reports["boxes"])
        out["finding"] += " " + out["comparison"]["finding"]
    return out


SEGMENT_NOTE = (
    "Segmented lungs: the bundled lung segmenter's right and left lung masks of each original image, moved onto "
    "the model's input and dilated by {pct:.0%} of its side (at least one pixel), so that lung edges are covered."
)
