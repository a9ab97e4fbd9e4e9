"""Lung boxes for every image: the annotations, a lung localizer trained on them, or the atlas.

The annotations (``<data>/annotations/lung_boxes.coco.json``: right lung = category 1, left lung = 2,
[x, y, w, h] in stored-image pixels) cover 151 Cohen images. For the rest:

* ``fit_localizer`` trains a two-class (right / left lung) SSD on them from scratch (grey input, see
  ``cxrscreen.models.detectors``) and saves it as a run-like directory (``kind: "localizer"``,
  loadable with ``runs.load_run``); ``crossval_localizer`` measures it (k folds grouped by
  ``split_group``: mAP@0.5 and the mean IoU of the best box per lung, with the atlas as a baseline).
* ``label_boxes`` writes a boxes CSV for a manifest: ``image, lung, x0, y0, x1, y1, score, source``
  in original pixels, one row per lung; ``source`` is "annotation", "localizer" or "atlas".
* The atlas is the deterministic fallback: the mean right / left lung boxes of the annotated images
  as fractions of the image's width and height (``DEFAULT_ATLAS`` when no annotation file is at hand).

Horizontal flips swap the labels (the image's right lung is on the viewer's left): ``FLIP_SWAP``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import RandomSampler

from cxrscreen.data.lung_boxes import (
    BOXES_COLUMNS,
    DEFAULT_ATLAS,
    FLIP_SWAP,
    LEFT,
    LUNG_CLASSES,
    RIGHT,
    BoxSource,
    ImageBoxes,
    LungAnnotations,
    atlas_boxes,
    default_annotations_path,
    image_sizes,
    size_of,
)
from cxrscreen.data.manifest import manifest_root, read_manifest, resolve_image_paths
from cxrscreen.engine.loop import EpochLoop
from cxrscreen.errors import CXRError
from cxrscreen.evaluation.formatting import format_value
from cxrscreen.evaluation.metrics import mean_average_precision
from cxrscreen.io.xray import read_xray
from cxrscreen.lungs.masks import lung_boxes
from cxrscreen.models.detectors import Detections, check_input_size, create_detector
from cxrscreen.runs.run_dir import LoadedRun, run_config, save_weights, write_config
from cxrscreen.tasks.detection import best_per_lung, detect, to_original
from cxrscreen.training.detection import DetectionDataset, detector_recipe
from cxrscreen.transforms.boxes import DetectionAugment
from cxrscreen.transforms.cache import PreprocessedCache, default_cache_dir, load_images
from cxrscreen.transforms.preprocess import Geometry, PreprocessConfig, geometry_for

# The localizer sees the whole image (padded to a square): no lung is cut off by a centre crop.
LOCALIZER_PREPROCESS = PreprocessConfig(image_size=160, clahe=True, resize_mode="pad")


# ------------------------------------------------------------------------------------------------ model
def train_localizer(
    images: np.ndarray,
    boxes: Sequence[np.ndarray],
    lungs: Sequence[np.ndarray],
    *,
    arch: str = "ssdlite320_mobilenet_v3_large",
    epochs: int = 30,
    batch_size: int = 16,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
    budget_minutes: float | None = None,
    device: str = "cpu",
    log: Callable[[str], None] = print,
) -> torch.nn.Module:
    """Train a right / left lung detector from scratch on uint8 squares (N, S, S).

    boxes[i]: (K, 4) model pixels; lungs[i]: (K,) 1 = right, 2 = left. The detector recipe (AdamW, warm-up
    over two epochs, at most 100 iterations, the SSD step schedule) with the flip swapping right and left, in the one
    epoch loop (no validation: the last epoch is kept). Returns the model in eval mode.
    """
    check_input_size(arch, images.shape[-1])
    torch.manual_seed(seed)
    dev = torch.device(device)
    model = create_detector(arch, num_classes=len(LUNG_CLASSES)).to(dev)
    ds = DetectionDataset(images, boxes, lungs, DetectionAugment(images.shape[-1], swap=FLIP_SWAP))
    gen = torch.Generator().manual_seed(seed)
    sampler = RandomSampler(range(len(ds)), generator=gen)
    recipe = detector_recipe(model, ds, sampler, lr=lr, weight_decay=weight_decay, epochs=epochs,
                             batch_size=batch_size, warmup_epochs=2, warmup_max=100)
    settings = SimpleNamespace(epochs=epochs, patience=epochs, monitor="train_loss", budget_minutes=budget_minutes)
    EpochLoop(settings, recipe, gen, dev, has_val=False, name="localizer ", log=log).run()
    return model.eval()


def localizer_scores(preds: Sequence[Detections], truths: Sequence[ImageBoxes]) -> dict[str, float | None]:
    """mAP@0.5 over the two lungs (all detections, scored) and the mean IoU of the best box per lung.

    preds and truths in the same (original) pixels; a lung with no predicted box counts IoU 0.
    """
    from torchvision.ops import box_iou

    gts = [(t.boxes, t.lungs) for t in truths]
    ious = []
    for d, t in zip(preds, truths, strict=True):
        best = best_per_lung(d)
        for b, lg in zip(t.boxes, t.lungs, strict=True):
            m = best["labels"] == lg
            if not m.any():
                ious.append(0.0)
                continue
            ious.append(float(box_iou(torch.as_tensor(best["boxes"][m][:1]), torch.as_tensor(b[None]))[0, 0]))
    return {"map50": mean_average_precision(preds, gts, [RIGHT, LEFT]),
            "mean_iou": float(np.mean(ious)) if ious else None}


@dataclass
class AnnotatedSet:
    """The annotated images of a manifest, preprocessed, with their boxes in both pixel spaces."""

    images: np.ndarray
    groups: list[str]
    paths: list[str]
    geometries: list[Geometry]
    truths: list[ImageBoxes]  # original pixels
    model_boxes: list[np.ndarray]
    model_lungs: list[np.ndarray]


def load_annotated(
    data_dir: str | Path,
    annotations: LungAnnotations,
    preprocess: PreprocessConfig,
    *,
    cache_dir: Path | None = None,
    max_images: int | None = None,
) -> AnnotatedSet:
    """Manifest rows that the annotations cover (first ``max_images`` of them), decoded through the cache."""
    from cxrscreen.transforms.boxes import boxes_to_model

    df = read_manifest(data_dir)
    paths = resolve_image_paths(df, manifest_root(data_dir))
    rows = [i for i, p in enumerate(paths) if annotations.index.get(p) is not None][:max_images]
    if not rows:
        raise CXRError(f"no manifest image is annotated in {annotations.path}", data_dir)
    cache = PreprocessedCache(preprocess, cache_dir if cache_dir is not None else default_cache_dir())
    loaded = load_images([paths[i] for i in rows], cache)
    sizes = image_sizes(data_dir)
    out = AnnotatedSet(loaded.images, [], [], [], [], [], [])
    for j in loaded.kept:
        p = paths[rows[j]]
        hw = size_of(p, sizes)
        truth = annotations.boxes_for(p, hw)
        assert truth is not None
        geom = geometry_for(preprocess, hw)
        mb, kept = boxes_to_model(geom, truth.boxes)
        out.groups.append(str(df["split_group"].iloc[rows[j]]))
        out.paths.append(str(p))
        out.geometries.append(geom)
        out.truths.append(truth)
        out.model_boxes.append(mb)
        out.model_lungs.append(truth.lungs[kept])
    return out


def group_folds(groups: Sequence[str], k: int, seed: int = 0) -> np.ndarray:
    """Fold index (0..k-1) per item; whole groups per fold, largest groups first to the smallest fold."""
    uniq, inverse, counts = np.unique(np.asarray(groups), return_inverse=True, return_counts=True)
    if len(uniq) < k:
        raise CXRError(f"{len(uniq)} groups cannot make {k} folds")
    order = np.random.default_rng(seed).permutation(len(uniq))
    order = order[np.argsort(-counts[order], kind="stable")]
    fold_of, sizes = np.zeros(len(uniq), np.int64), np.zeros(k, np.int64)
    for g in order:
        f = int(np.argmin(sizes))
        fold_of[g] = f
        sizes[f] += counts[g]
    return fold_of[inverse]


def crossval_localizer(
    data_dir: str | Path,
    *,
    k: int = 5,
    seed: int = 0,
    arch: str = "ssdlite320_mobilenet_v3_large",
    preprocess: PreprocessConfig = LOCALIZER_PREPROCESS,
    epochs: int = 30,
    batch_size: int = 16,
    lr: float = 2e-3,
    annotations: str | Path | None = None,
    cache_dir: Path | None = None,
    max_images: int | None = None,
    budget_minutes_per_fold: float | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """k-fold cross-validation of the lung localizer, folds grouped by ``split_group``.

    Returns {"map50", "mean_iou" (pooled over the out-of-fold predictions of all folds), "folds": [per
    fold: fold, n_train, n_test, map50, mean_iou, atlas_map50, atlas_mean_iou, seconds], "atlas": the
    same figures for the atlas boxes (computed from each fold's training images), "n_images", "settings"}.
    Figures are in original pixels.
    """
    ann = LungAnnotations.from_coco(annotations or default_annotations_path(data_dir))
    data = load_annotated(data_dir, ann, preprocess, cache_dir=cache_dir, max_images=max_images)
    fold = group_folds(data.groups, k, seed)
    preds: list[Detections | None] = [None] * len(data.paths)
    atlas_preds: list[Detections | None] = [None] * len(data.paths)
    folds = []
    for f in range(k):
        t0 = time.monotonic()
        tr, te = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
        model = train_localizer(data.images[tr], [data.model_boxes[i] for i in tr], [data.model_lungs[i] for i in tr],
                                arch=arch, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed + f,
                                budget_minutes=budget_minutes_per_fold, log=log)
        dets = detect(model, data.images[te])
        atlas = _atlas_of([data.truths[i] for i in tr], [data.geometries[i].original_hw for i in tr])
        for i, d in zip(te, dets, strict=True):
            preds[i] = to_original(d, data.geometries[i])
            ab = atlas_boxes(atlas, data.geometries[i].original_hw)
            atlas_preds[i] = {"boxes": ab.boxes, "labels": ab.lungs, "scores": np.ones(len(ab.lungs), np.float32)}
        truths = [data.truths[i] for i in te]
        s = localizer_scores([preds[i] for i in te], truths)  # type: ignore[misc]
        a = localizer_scores([atlas_preds[i] for i in te], truths)  # type: ignore[misc]
        folds.append({"fold": f, "n_train": int(len(tr)), "n_test": int(len(te)), **s,
                      "atlas_map50": a["map50"], "atlas_mean_iou": a["mean_iou"],
                      "seconds": round(time.monotonic() - t0, 1)})
        log(f"fold {f + 1}/{k}: mAP@0.5 {_fmt(s['map50'])}, mean IoU {_fmt(s['mean_iou'])} "
            f"(atlas {_fmt(a['map50'])}, {_fmt(a['mean_iou'])})")
    pooled = localizer_scores(preds, data.truths)  # type: ignore[arg-type]
    pooled_atlas = localizer_scores(atlas_preds, data.truths)  # type: ignore[arg-type]
    return {
        **pooled,
        "folds": folds,
        "atlas": pooled_atlas,
        "n_images": len(data.paths),
        "n_groups": len(set(data.groups)),
        "settings": {"k": k, "seed": seed, "arch": arch, "epochs": epochs, "batch_size": batch_size, "lr": lr,
                     "preprocess": preprocess.to_dict(), "budget_minutes_per_fold": budget_minutes_per_fold,
                     "annotations": ann.path, "annotations_sha256": ann.sha256},
    }


_fmt = format_value  # 3 decimals, "n/a" for None


def _atlas_of(truths: Sequence[ImageBoxes], hws: Sequence[tuple[int, int]]) -> dict[int, tuple[float, ...]]:
    """The atlas (mean normalised box per lung) of annotated images of shapes hws."""
    fr: dict[int, list[np.ndarray]] = {RIGHT: [], LEFT: []}
    for t, (h, w) in zip(truths, hws, strict=True):
        for b, lg in zip(t.boxes, t.lungs, strict=True):
            fr[int(lg)].append(b / np.array([w, h, w, h], np.float32))
    return {k: tuple(float(x) for x in np.mean(v, axis=0)) if v else DEFAULT_ATLAS[k] for k, v in fr.items()}


def fit_localizer(
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    arch: str = "ssdlite320_mobilenet_v3_large",
    preprocess: PreprocessConfig = LOCALIZER_PREPROCESS,
    epochs: int = 30,
    batch_size: int = 16,
    lr: float = 2e-3,
    seed: int = 0,
    annotations: str | Path | None = None,
    cache_dir: Path | None = None,
    max_images: int | None = None,
    budget_minutes: float | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train the localizer on every annotated image and save it to out_dir (model.safetensors,
    config.json with kind "localizer"); returns the config. Load it with ``runs.load_run``."""
    ann = LungAnnotations.from_coco(annotations or default_annotations_path(data_dir))
    data = load_annotated(data_dir, ann, preprocess, cache_dir=cache_dir, max_images=max_images)
    t0 = time.monotonic()
    model = train_localizer(data.images, data.model_boxes, data.model_lungs, arch=arch, epochs=epochs,
                            batch_size=batch_size, lr=lr, seed=seed, budget_minutes=budget_minutes, log=log)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sha = save_weights(model, out)
    config = run_config(
        kind="localizer", arch=arch, classes=list(LUNG_CLASSES), preprocess=preprocess,
        training={"epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed, "budget_minutes": budget_minutes,
                  "optimizer": "adamw", "schedule": "warm-up, x0.1 at 2/3, 5/6"},
        seed=seed,
        data={"manifest": str(data_dir), "annotations": ann.path, "annotations_sha256": ann.sha256,
              "images": len(data.paths)},
        weights_sha256=sha, train_seconds=round(time.monotonic() - t0, 1))
    write_config(out, config)
    return config


# ------------------------------------------------------------------------------------------------ label
def _chunks(n: int, size: int) -> Iterator[range]:
    for i in range(0, n, size):
        yield range(i, min(n, i + size))


def label_boxes(
    localizer: LoadedRun | None,
    data_dir: str | Path,
    out_csv: str | Path,
    *,
    annotations: str | Path | None = None,
    min_score: float = 0.3,
    cache_dir: Path | None = None,
    chunk: int = 64,
    segmenter: Any | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Write the boxes CSV of every manifest image (``BOXES_COLUMNS``, original pixels, one row per lung).

    Annotated images get their annotation (score 1); the others the localizer's best box per lung when
    it scores >= min_score, else the atlas box (score empty, source "atlas"). localizer=None: the boxes of
    the `segmenter`'s (a LungSegmenter) right and left lung masks (score empty, source "segmenter"), the atlas
    box for a lung it does not find; neither: atlas only. Files that cannot be read are listed in
    "skipped_files". Returns a summary {"out", "images", "rows", "by_source": {source: rows}, "localizer",
    "segmenter", "atlas", "skipped_files"}.
    """
    data_dir = Path(data_dir)
    ann_path = Path(annotations) if annotations else default_annotations_path(data_dir)
    source = BoxSource(LungAnnotations.from_coco(ann_path) if ann_path.is_file() else None)
    df = read_manifest(data_dir)
    paths = resolve_image_paths(df, manifest_root(data_dir))
    sizes = image_sizes(data_dir)
    if localizer is not None and tuple(localizer.classes) != LUNG_CLASSES:
        raise CXRError(f"not a lung localizer (classes {localizer.classes})", localizer.run_dir)
    cache = None
    if localizer is not None:
        cache = PreprocessedCache(localizer.preprocess, cache_dir if cache_dir is not None else default_cache_dir())
    rows: list[dict[str, Any]] = []

    def emit(image: str, ib: ImageBoxes, src: str | None = None) -> None:
        for b, lg, s in zip(ib.boxes, ib.lungs, ib.scores, strict=True):
            rows.append({"image": image, "lung": LUNG_CLASSES[int(lg) - 1], "x0": round(float(b[0]), 1),
                         "y0": round(float(b[1]), 1), "x1": round(float(b[2]), 1), "y1": round(float(b[3]), 1),
                         "score": None if math.isnan(float(s)) else round(float(s), 4), "source": src or ib.source})

    todo: list[int] = []
    for i, p in enumerate(paths):
        annotated = source.annotations is not None and source.annotations.index.get(p) is not None
        if annotated:
            emit(df["image"].iloc[i], source.annotations.boxes_for(p, size_of(p, sizes)))  # type: ignore[union-attr]
        elif localizer is None and segmenter is None:
            emit(df["image"].iloc[i], atlas_boxes(source.atlas, size_of(p, sizes)))
        else:
            todo.append(i)
    errors: dict[str, str] = {}
    if localizer is None and segmenter is not None:
        for n, i in enumerate(todo, 1):
            try:
                pixels = read_xray(paths[i]).pixels
            except CXRError as exc:
                errors[str(paths[i])] = str(exc)
                continue
            boxes, lungs = lung_boxes(segmenter.segment(pixels).mask)
            fallback = atlas_boxes(source.atlas, pixels.shape[:2])
            for lg in (RIGHT, LEFT):
                m, f = lungs == lg, fallback.lungs == lg
                ib = (ImageBoxes(boxes[m], lungs[m], np.full(int(m.sum()), np.nan, np.float32), "segmenter")
                      if m.any() else ImageBoxes(fallback.boxes[f], fallback.lungs[f], fallback.scores[f], "atlas"))
                emit(df["image"].iloc[i], ib)
            if n % chunk == 0 or n == len(todo):
                log(f"labelled {n}/{len(todo)} images with the lung segmenter")
        todo = []
    for part in _chunks(len(todo), chunk):
        idx = [todo[j] for j in part]
        assert localizer is not None and cache is not None
        loaded = load_images([paths[i] for i in idx], cache)
        errors.update(loaded.errors)
        dets = detect(localizer.model, loaded.images)
        for j, d in zip(loaded.kept, dets, strict=True):
            i = idx[j]
            hw = size_of(paths[i], sizes)
            best = to_original(best_per_lung(d), geometry_for(localizer.preprocess, hw))
            fallback = atlas_boxes(source.atlas, hw)
            for lg in (RIGHT, LEFT):
                m = (best["labels"] == lg) & (best["scores"] >= min_score)
                if m.any():
                    emit(df["image"].iloc[i], ImageBoxes(best["boxes"][m], best["labels"][m], best["scores"][m],
                                                         "localizer"))
                else:
                    f = fallback.lungs == lg
                    emit(df["image"].iloc[i], ImageBoxes(fallback.boxes[f], fallback.lungs[f], fallback.scores[f],
                                                         "atlas"))
        log(f"labelled {min(len(todo), part.stop)}/{len(todo)} images with the localizer")
    out = Path(out_csv)
    out.parent.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(rows, columns=BOXES_COLUMNS)
    table.to_csv(out, index=False)
    return {"out": str(out), "images": int(table["image"].nunique()), "rows": len(table),
            "by_source": {k: int(v) for k, v in table["source"].value_counts().items()},
            "localizer": None if localizer is None else str(localizer.run_dir),
            "segmenter": None if segmenter is None or localizer is not None else str(segmenter.folder),
            "atlas": {LUNG_CLASSES[k - 1]: list(v) for k, v in sorted(source.atlas.items())},
            "skipped_files": errors}

