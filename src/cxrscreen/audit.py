"""Shortcut audit of a trained classifier: does it read the lungs, or recognise the hospital?

In the cxr data source and label go together (every covid image is web-collected, every normal and
nearly every pneumonia image is from NIH), so a model can score by recognising where an image came
from. `run_audit` checks this in four parts, each optional:

- per_source: the model's figures per source on the split's test subset.
- masking: the same test images with the lung boxes blacked out ("lungs_masked") and with everything
  but the lung boxes blacked out ("lungs_only"). A model that stays accurate with no lung visible
  reads something else. Boxes come from the COCO lung annotations where an image has them, else from
  an atlas (the mean normalised boxes of the annotated images).
- probe: the audited recipe (architecture, preprocessing, augmentation) trained to predict the
  source instead of the label. High accuracy means the images carry the hospital in them.
- loso: leave one source out: the recipe trained without a source and tested on it.

It writes `audit.json`, `audit.md` (plain-language findings) and PNG plots into `out_dir`.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import confusion_matrix, f1_score
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, WeightedRandomSampler

from cxrscreen import CLASSES
from cxrscreen.data.dataset import PreprocessedCache, XRayTensorDataset, default_cache_dir
from cxrscreen.data.manifest import file_sha256, manifest_csv, manifest_root, read_manifest
from cxrscreen.data.splits import read_split, split_grouped, split_source, write_split
from cxrscreen.decision import DecisionRule, decide
from cxrscreen.engine import class_weights, evaluate_epoch, train_one_epoch
from cxrscreen.errors import CXRError
from cxrscreen.evaluate import evaluate_run, run_probabilities
from cxrscreen.io import read_xray
from cxrscreen.metrics import classification_report
from cxrscreen.models.registry import create_model
from cxrscreen.runs import LoadedRun, load_run, package_versions
from cxrscreen.training import SubsetData, TrainConfig, load_subset, pick_device, seed_everything, train
from cxrscreen.transforms import Geometry, Preprocessor, eval_transform, train_transform

PARTS: tuple[str, ...] = ("per_source", "masking", "probe", "loso")
CONDITIONS: tuple[str, ...] = ("original", "lungs_masked", "lungs_only")
BOX_SUBSETS: tuple[str, ...] = ("all", "annotated", "atlas")
LUNG_CATEGORIES: dict[int, str] = {1: "right", 2: "left"}  # COCO category id -> lung (patient's side)
MIN_JUDGE_N = 20  # fewer images than this: no verdict
ATLAS_NOTE = (
    "Images without annotated lung boxes get atlas boxes: the mean right and left lung boxes of the "
    "annotated images, as fractions of the original image's width and height. Atlas boxes only "
    "roughly cover the lungs of any one image."
)

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in original pixels
PixelBox = tuple[int, int, int, int]  # x0, y0, x1, y1 in model pixels, half-open


# ------------------------------------------------------------------------------------------- lung boxes
def default_lung_boxes_path(data_dir: Path) -> Path:
    """<manifest folder>/annotations/lung_boxes.coco.json."""
    return manifest_root(data_dir) / "annotations" / "lung_boxes.coco.json"


@dataclass
class LungBoxes:
    """Lung boxes per annotated image (from a COCO file) and the atlas of their mean.

    annotated: COCO file_name -> ((height, width) of the annotated image, boxes x0, y0, x1, y1).
    atlas: mean boxes as fractions (x0 / W, y0 / H, x1 / W, y1 / H), one per lung.
    """

    annotated: dict[str, tuple[tuple[int, int], list[Box]]]
    atlas: dict[str, Box]
    path: str
    sha256: str

    @classmethod
    def from_coco(cls, path: Path) -> LungBoxes:
        """Read a COCO file whose categories 1 and 2 are the right and left lung."""
        try:
            coco = json.loads(Path(path).read_text())
            images = {im["id"]: im for im in coco["images"]}
            anns = coco["annotations"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CXRError(f"not a readable COCO lung-box file ({exc})", path) from exc
        annotated: dict[str, tuple[tuple[int, int], list[Box]]] = {}
        fractions: dict[str, list[Box]] = {name: [] for name in LUNG_CATEGORIES.values()}
        for a in anns:
            if a.get("category_id") not in LUNG_CATEGORIES or a.get("image_id") not in images:
                continue
            im = images[a["image_id"]]
            w, h = float(im["width"]), float(im["height"])
            x, y, bw, bh = map(float, a["bbox"])
            entry = annotated.setdefault(str(im["file_name"]), ((int(h), int(w)), []))
            entry[1].append((x, y, x + bw, y + bh))
            fractions[LUNG_CATEGORIES[a["category_id"]]].append((x / w, y / h, (x + bw) / w, (y + bh) / h))
        if any(not v for v in fractions.values()):
            raise CXRError("the COCO file has no boxes for one of the lungs (categories 1, 2)", path)
        atlas: dict[str, Box] = {}
        for k, v in fractions.items():
            x0, y0, x1, y1 = (float(f) for f in np.mean(v, axis=0))
            atlas[k] = (x0, y0, x1, y1)
        return cls(annotated=annotated, atlas=atlas, path=str(path), sha256=file_sha256(path))

    def _key(self, path: str | Path) -> str | None:
        parts = Path(path).parts
        for n in sorted({len(PurePosixPath(k).parts) for k in self.annotated}):
            key = "/".join(parts[-n:])
            if key in self.annotated:
                return key
        return None

    def boxes_for(self, path: str | Path, hw: tuple[int, int]) -> tuple[list[Box], str]:
        """Boxes in the original pixels of an image of shape hw, and "annotated" or "atlas".

        An image is matched when its path ends with a COCO file_name (manifest `image` paths).
        """
        h, w = hw
        key = self._key(path)
        if key is not None:
            (ah, aw), boxes = self.annotated[key]
            sx, sy = w / aw, h / ah
            return [(x0 * sx, y0 * sy, x1 * sx, y1 * sy) for x0, y0, x1, y1 in boxes], "annotated"
        return [(fx0 * w, fy0 * h, fx1 * w, fy1 * h) for fx0, fy0, fx1, fy1 in self.atlas.values()], "atlas"


def boxes_to_model(geom: Geometry, boxes: Sequence[Box]) -> list[PixelBox]:
    """Original-pixel boxes -> model-pixel boxes [x0, x1) x [y0, y1), widened to whole pixels and clipped.

    Boxes that fall wholly outside the model input (e.g. cut off by a centre crop) are dropped.
    """
    out: list[PixelBox] = []
    for box in boxes:
        x0, y0, x1, y1 = geom.box_to_model(box)
        ix0, iy0 = max(0, math.floor(x0)), max(0, math.floor(y0))
        ix1, iy1 = min(geom.size, math.ceil(x1)), min(geom.size, math.ceil(y1))
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
        boxes.append(boxes_to_model(geom, orig))
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


# -------------------------------------------------------------------------------------------- source probe
def _pool(data_dir: Path, split_csv: Path) -> pd.DataFrame:
    """Manifest rows that the split lists (the images the audited run could draw on)."""
    df = read_manifest(data_dir)
    keep = set(read_split(split_csv)["image"])
    return df[df["image"].isin(keep)].reset_index(drop=True)


def _recipe(
    run: LoadedRun,
    *,
    budget_minutes: float | None,
    epochs: int | None,
    cache_dir: Path | None,
    device: str | None,
) -> TrainConfig:
    """The audited run's training recipe, with the audit's budget / epoch / cache / device overrides."""
    cfg = TrainConfig.from_dict(run.config["training"])
    if budget_minutes is not None:
        cfg.budget_minutes = budget_minutes
    if epochs is not None:
        cfg.epochs = epochs
    if cache_dir is not None:
        cfg.cache_dir = str(cache_dir)
    if device is not None:
        cfg.device = device
    return cfg


def source_probe(
    cfg: TrainConfig,
    data_dir: Path,
    pool: pd.DataFrame,
    out_dir: Path,
    *,
    seed: int,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train cfg's architecture and preprocessing to predict `source` on a grouped split; test figures."""
    split = split_grouped(pool, seed=seed, test_frac=0.2, val_frac=0.1)
    split_csv = write_split(split, Path(out_dir) / "split.csv")
    cache = PreprocessedCache(cfg.preprocess, Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir())
    sets = {s: load_subset(Path(data_dir), split_csv, s, cache, list(CLASSES)) for s in ("train", "val", "test")}
    sources = sorted(set(pool["source"]))
    y = {k: np.array([sources.index(s) for s in v.sources], dtype=np.int64) for k, v in sets.items()}
    if len(y["train"]) == 0 or len(y["test"]) == 0:
        raise CXRError("the probe split has no train or no test images", split_csv)

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    model = create_model(cfg.arch, num_classes=len(sources), in_chans=1, weights=cfg.weights).to(device)
    weight = class_weights(y["train"], len(sources)) if cfg.balance == "loss" else None
    criterion = nn.CrossEntropyLoss(
        weight=None if weight is None else weight.to(device), label_smoothing=cfg.label_smoothing
    )
    eval_criterion = nn.CrossEntropyLoss(weight=weight)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(cfg.epochs, 1))
    generator = torch.Generator().manual_seed(cfg.seed)
    train_ds = XRayTensorDataset(sets["train"].images, y["train"], train_transform(cfg.preprocess, cfg.augment))
    n_epoch = min(cfg.max_train_images_per_epoch or len(train_ds), len(train_ds))
    if cfg.balance == "sampler":
        w = 1.0 / np.bincount(y["train"], minlength=len(sources))[y["train"]]
        sampler: Any = WeightedRandomSampler(w.tolist(), n_epoch, replacement=True, generator=generator)
    else:
        sampler = RandomSampler(train_ds, num_samples=n_epoch, generator=generator)
    train_loader = DataLoader(
        train_ds,
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.num_workers,
        drop_last=len(train_ds) > cfg.batch_size,
    )

    def loader(k: str) -> DataLoader:
        ds = XRayTensorDataset(sets[k].images, y[k], eval_transform(cfg.preprocess))
        return DataLoader(ds, batch_size=max(cfg.batch_size, 64))

    t_start = time.monotonic()
    deadline = cfg.budget_minutes * 60 if cfg.budget_minutes else None
    out_of_time = (lambda: time.monotonic() - t_start > deadline) if deadline else None
    best_loss, best_state, bad, history = math.inf, None, 0, []
    for epoch in range(1, cfg.epochs + 1):
        train_loss, seen = train_one_epoch(
            model, train_loader, criterion, optimizer, device=device, deadline=out_of_time
        )
        val_loss, _, _ = evaluate_epoch(model, loader("val"), eval_criterion, device=device)
        scheduler.step()
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "train_images": seen})
        log(f"probe epoch {epoch}: train loss {train_loss:.4f}, val loss {val_loss:.4f}")
        if best_state is None or not np.isfinite(best_loss) or val_loss < best_loss:
            best_loss, bad = val_loss, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
        if bad >= cfg.patience or (out_of_time is not None and out_of_time()):
            break
    assert best_state is not None
    model.load_state_dict(best_state)
    _, probs, _ = evaluate_epoch(model, loader("test"), eval_criterion, device=device)
    return probe_figures(
        y["test"], probs.argmax(1), sources, sets, history, seconds=round(time.monotonic() - t_start, 1)
    )


def probe_figures(
    y_test: np.ndarray,
    pred: np.ndarray,
    sources: list[str],
    sets: dict[str, SubsetData],
    history: list[dict[str, Any]],
    *,
    seconds: float,
) -> dict[str, Any]:
    """Accuracy, macro-F1, chance (majority source rate) and the label-only baseline of a source probe.

    label_only_accuracy: accuracy of naming, for each test image, the commonest train source of its
    label; the probe beating it means it tells sources apart beyond what the disease gives away.
    """
    present = sorted(set(y_test.tolist()))
    acc = float((pred == y_test).mean())
    tr_labels, tr_src = sets["train"].labels, np.array([sources.index(s) for s in sets["train"].sources])
    by_label = {int(lbl): int(np.bincount(tr_src[tr_labels == lbl]).argmax()) for lbl in np.unique(tr_labels)}
    label_pred = np.array([by_label.get(int(lbl), -1) for lbl in sets["test"].labels])
    label_only = float((label_pred == y_test).mean())
    chance = _chance(y_test)
    assert chance is not None
    flag = acc >= chance + 0.1
    if flag:
        finding = (
            f"A model with the audited recipe names the source of a test image with accuracy {acc:.2f} "
            f"(chance {chance:.2f}, label-only {label_only:.2f}): the images carry their hospital, so a "
            "classifier can score by recognising it."
        )
    else:
        finding = (
            f"The source probe scores {acc:.2f}, near chance ({chance:.2f}): it did not learn to name the "
            "source within its budget. That is weak evidence that the images hide their source."
        )
    if flag and acc > label_only + 0.05:
        finding += " It beats the label-only baseline, so it reads the source beyond the disease."
    return {
        "sources": sources,
        "n_train": int(len(sets["train"].labels)),
        "n_val": int(len(sets["val"].labels)),
        "n_test": int(len(y_test)),
        "accuracy": acc,
        "macro_f1": float(f1_score(y_test, pred, labels=present, average="macro", zero_division=0)),
        "chance": chance,
        "label_only_accuracy": label_only,
        "recall": {sources[k]: float((pred[y_test == k] == k).mean()) for k in present},
        "confusion_matrix": confusion_matrix(y_test, pred, labels=list(range(len(sources)))).tolist(),
        "confusion_matrix_axes": "rows: true source, columns: predicted source, in the order of `sources`",
        "history": history,
        "train_seconds": seconds,
        "shortcut_flag": bool(flag),
        "finding": finding,
    }


# ------------------------------------------------------------------------------------------------- LOSO
def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def loso_one(
    cfg: TrainConfig,
    data_dir: Path,
    pool: pd.DataFrame,
    source: str,
    out_dir: Path,
    internal: dict[str, Any],
    *,
    seed: int,
    n_boot: int,
    device: torch.device,
    cache_dir: Path | None,
    log: Callable[[str], None] = print,
    progress_factory: Callable[[str, int], Any] | None = None,
) -> dict[str, Any]:
    """Train without `source` (resumable run in out_dir/run), test on it, compare with internal figures."""
    out_dir = Path(out_dir)
    split = split_source(pool, holdout_source=source, seed=seed)
    split_csv = out_dir / "split.csv"
    if not split_csv.is_file() or not read_split(split_csv).equals(split):
        write_split(split, split_csv)
    merged = split.merge(pool[["image", "label", "source"]], on="image")
    tr = merged[merged["subset"] == "train"]
    train_counts = {c: int((tr["label"] == c).sum()) for c in CLASSES}
    train(cfg, data_dir, split_csv, out_dir / "run", log=log, progress_factory=progress_factory)
    held_run = load_run(out_dir / "run", device=device)
    ev = evaluate_run(
        held_run, data_dir, split_csv=split_csv, subset="test", n_boot=n_boot, seed=seed, cache_dir=cache_dir
    )
    rep = ev["per_source"].get(source)
    if rep is None:
        raise CXRError(f"no usable images of {source!r} in the held-out test set", split_csv)
    held = _summary(rep)
    sole = [c for c in held["recall"] if set(pool.loc[pool["label"] == c, "source"]) == {source}]
    entry: dict[str, Any] = {
        "held_out": held,
        "train_images": int(len(tr)),
        "train_class_counts": train_counts,
        "other_sources_in_test": {
            s: int(n)
            for s, n in merged[(merged["subset"] == "test") & (merged["source"] != source)]["source"]
            .value_counts()
            .items()
        },
        "classes_without_training_images": [c for c, n in train_counts.items() if n == 0],
        "classes": list(held["recall"]),
        "single_class_source": len(held["recall"]) == 1,
        "sole_source_of": sole,
        "run": str(out_dir / "run"),
        "stop_reason": held_run.config.get("stop_reason"),
        "weights_sha256": held_run.config.get("weights_sha256"),
    }
    inner = internal.get(source)
    if inner is not None:
        entry["internal"] = inner
        entry["gap"] = None if inner["accuracy"] is None else inner["accuracy"] - held["accuracy"]
        entry["recall_gap"] = {
            c: inner["recall"][c] - held["recall"][c] for c in held["recall"] if c in inner["recall"]
        }
    return entry


# ------------------------------------------------------------------------------------------------- plots
def _figure(width: float = 6.5, height: float = 3.8) -> Any:
    from matplotlib.figure import Figure  # object API: Agg canvas, no pyplot state

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.add_subplot()


def plot_masking(masking: dict[str, Any], path: Path) -> Path:
    """Bars: accuracy on original / lungs-masked / lungs-only per box kind, with chance."""
    fig, ax = _figure()
    names = [s for s in BOX_SUBSETS if masking["subsets"][s].get("n")]
    x = np.arange(len(names))
    for i, c in enumerate(CONDITIONS):
        vals = [masking["subsets"][s][c]["accuracy"] for s in names]
        ax.bar(x + (i - 1) * 0.27, vals, 0.27, label=c.replace("_", "-"))
    for j, s in enumerate(names):
        ax.hlines(
            masking["subsets"][s]["chance"],
            j - 0.42,
            j + 0.42,
            colors="k",
            linestyles="--",
            label="chance (majority class)" if j == 0 else None,
        )
    ax.set_xticks(x, [f"{s} boxes\n(n={masking['subsets'][s]['n']})" for s in names])
    ax.set_ylim(0, 1.3)
    ax.set_ylabel("accuracy")
    ax.set_title("Accuracy with lungs masked / only lungs shown")
    ax.legend(fontsize=8, loc="upper center", ncol=2)
    fig.savefig(path, dpi=110)
    return path


def plot_loso(loso: dict[str, Any], path: Path) -> Path:
    """Bars per source: held-out accuracy (LOSO model) vs the audited model on the internal test split."""
    fig, ax = _figure()
    names = list(loso["sources"])
    x = np.arange(len(names))
    internal = [loso["sources"][s].get("internal", {}).get("accuracy") or 0.0 for s in names]
    held = [loso["sources"][s]["held_out"]["accuracy"] or 0.0 for s in names]
    ax.bar(x - 0.2, internal, 0.4, label="internal test (audited model)")
    ax.bar(x + 0.2, held, 0.4, label="held-out source (LOSO model)")
    ax.set_xticks(x, names)
    ax.set_ylim(0, 1.25)
    ax.set_ylabel("accuracy")
    ax.set_title("Leave-one-source-out")
    ax.legend(fontsize=8, loc="upper center", ncol=2)
    fig.savefig(path, dpi=110)
    return path


def plot_probe(probe: dict[str, Any], path: Path) -> Path:
    """Bars: source-probe accuracy, label-only baseline, chance."""
    fig, ax = _figure(5.0, 3.5)
    vals = [probe["accuracy"], probe["label_only_accuracy"], probe["chance"]]
    ax.bar(["source probe", "label only", "chance"], vals, color=["C3", "C1", "0.6"])
    for i, v in enumerate(vals):
        ax.text(i, v + 0.02, f"{v:.2f}", ha="center")
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("accuracy at naming the source")
    ax.set_title(f"Source probe ({len(probe['sources'])} sources)")
    fig.savefig(path, dpi=110)
    return path


def plot_masking_examples(ms: MaskingSet, path: Path, k: int = 4) -> Path:
    """A few test images under each condition, annotated-box images first."""
    from matplotlib.figure import Figure

    order = sorted(range(len(ms.kinds)), key=lambda i: ms.kinds[i] != "annotated")[:k]
    fig = Figure(figsize=(2.0 * len(CONDITIONS), 2.0 * max(len(order), 1)), layout="constrained")
    for r, i in enumerate(order):
        for c, cond in enumerate(CONDITIONS):
            ax = fig.add_subplot(len(order), len(CONDITIONS), r * len(CONDITIONS) + c + 1)
            ax.imshow(mask_image(ms.data.images[i], ms.boxes[i], cond), cmap="gray", vmin=0, vmax=255)
            ax.set_axis_off()
            ax.set_title(f"{cond} ({ms.kinds[i]})" if c == 0 else cond, fontsize=7)
    fig.savefig(path, dpi=110)
    return path


# ------------------------------------------------------------------------------------------------ report
def _f(v: Any) -> str:
    if isinstance(v, dict):
        v = v.get("value")
    return "n/a" if v is None else f"{v:.3f}"


def _loso_note(e: dict[str, Any]) -> str:
    notes = []
    if e["single_class_source"]:
        notes.append(f"all {e['classes'][0]}: a test of that class from an unseen hospital")
    if e["sole_source_of"]:
        notes.append(f"only source of {', '.join(e['sole_source_of'])}")
    if e["classes_without_training_images"]:
        notes.append(f"no training images of {', '.join(e['classes_without_training_images'])}")
    return "; ".join(notes) or "-"


def write_markdown(result: dict[str, Any], path: Path) -> Path:
    """audit.md: the findings in plain language, then one section per part."""
    meta = result["meta"]
    lines = [
        f"# Shortcut audit of `{meta['model']}`",
        "",
        f"Model {meta['arch']} (weights sha256 `{meta['weights_sha256']}`), data `{meta['data']}`, "
        f"split `{meta['split']}`, test subset. Created {meta['created']}.",
        "",
        "The cxr data ties source to label: every covid image is web-collected, every normal and nearly "
        "every pneumonia image comes from NIH. A model can score by recognising the hospital. "
        "These tests look for that.",
        "",
        "## Findings",
        "",
    ]
    lines += [f"- {f}" for f in result["findings"]] or ["- (no part run)"]
    if "per_source" in result:
        ps = result["per_source"]
        lines += [
            "",
            "## Per source (audited model, test subset)",
            "",
            "| source | n | accuracy | chance | recall per class | COVID AUC |",
            "|---|---|---|---|---|---|",
        ]
        for name, s in [("all", ps["overall"]), *ps["sources"].items()]:
            rec = ", ".join(f"{c} {v:.2f}" for c, v in s["recall"].items())
            lines.append(
                f"| {name} | {s['n']} | {_f(s['accuracy'])} | {_f(s['chance'])} | {rec} | {_f(s['covid_auc'])} |"
            )
        lines += ["", ps["note"]]
    if "masking" in result and "skipped" in result["masking"]:
        lines += ["", "## Lungs masked / lungs only", "", f"Skipped: {result['masking']['skipped']}."]
    elif "masking" in result:
        mk = result["masking"]
        lines += [
            "",
            "## Lungs masked / lungs only",
            "",
            f"Lung boxes: {mk['n_annotated']} test images with annotated boxes, {mk['n_atlas']} with atlas "
            f"boxes. {mk['box_note']} Boxes are blacked out (set to 0) in the preprocessed image, "
            "after CLAHE.",
            "",
            "| boxes | n | chance | condition | accuracy | macro-F1 | COVID AUC |",
            "|---|---|---|---|---|---|---|",
        ]
        for s in BOX_SUBSETS:
            e = mk["subsets"][s]
            if not e.get("n"):
                continue
            for c in CONDITIONS:
                lines.append(
                    f"| {s} | {e['n']} | {_f(e['chance'])} | {c} | {_f(e[c]['accuracy'])} | "
                    f"{_f(e[c]['macro_f1'])} | {_f(e[c]['covid_auc'])} |"
                )
        for s in BOX_SUBSETS:
            e = mk["subsets"][s]
            if e.get("n"):
                notes = [e["finding"], e["covid_finding"], e["collapse_note"]]
                lines.append(f"- {s} boxes: " + "; ".join(n for n in notes if n) + ".")
        lines += [
            "",
            "Annotated boxes exist only for Cohen images (mostly covid), so that subset's chance "
            "rate is high; the `all` row is the one to read first.",
            "",
            "![masking](masking.png)",
        ]
    if "probe" in result:
        pr = result["probe"]
        lines += [
            "",
            "## Source probe",
            "",
            f"The audited recipe trained to name the source ({', '.join(pr['sources'])}) on a grouped split "
            f"({pr['n_train']} train / {pr['n_val']} val / {pr['n_test']} test images).",
            "",
            f"- accuracy {pr['accuracy']:.3f}, macro-F1 {pr['macro_f1']:.3f}",
            f"- chance (majority source) {pr['chance']:.3f}; "
            f"label-only baseline {pr['label_only_accuracy']:.3f} "
            "(naming the commonest source of the image's label)",
            f"- recall per source: {', '.join(f'{k} {v:.2f}' for k, v in pr['recall'].items())}",
            "",
            pr["finding"],
            "",
            "![probe](probe.png)",
        ]
    if "loso" in result:
        lo = result["loso"]
        lines += [
            "",
            "## Leave one source out",
            "",
            "Each model is the audited recipe trained without one source, then tested on that source. "
            "`internal` is the audited model on that source's images in the internal test split.",
            "",
            "| held-out source | n | held-out accuracy | internal accuracy | gap | held-out recall | note |",
            "|---|---|---|---|---|---|---|",
        ]
        for s, e in lo["sources"].items():
            h = e["held_out"]
            rec = ", ".join(f"{c} {v:.2f}" for c, v in h["recall"].items())
            lines.append(
                f"| {s} | {h['n']} | {_f(h['accuracy'])} | {_f(e.get('internal', {}).get('accuracy'))} | "
                f"{_f(e.get('gap'))} | {rec} | {_loso_note(e)} |"
            )
        lines += ["", lo["note"]]
        if lo["skipped"]:
            lines += [
                "",
                "Not held out: " + ", ".join(f"{k} ({v})" for k, v in lo["skipped"].items()),
            ]
        lines += ["", "![loso](loso.png)"]
    lines += [
        "",
        "## Reproducibility",
        "",
        f"Seed {meta['seed']} (splits, bootstrap; training seed {meta['training_seed']}), "
        f"bootstrap {meta['n_boot']} resamples of split_group, budget {meta['budget_minutes_per_model']} min "
        f"per trained model, epochs {meta['loso_epochs'] or 'as the recipe'}. "
        f"Manifest sha256 `{meta['manifest_sha256']}`, split sha256 `{meta['split_sha256']}`. "
        "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".",
        "",
    ]
    Path(path).write_text("\n".join(lines))
    return Path(path)


# ------------------------------------------------------------------------------------------------- audit
def run_audit(
    run_dir: Path,
    data_dir: Path,
    split_csv: Path,
    out_dir: Path,
    *,
    budget_minutes_per_model: float | None = 5.0,
    loso_epochs: int | None = None,
    parts: Sequence[str] = PARTS,
    cache_dir: Path | None = None,
    n_boot: int = 500,
    seed: int = 0,
    lung_boxes: Path | None = None,
    loso_sources: Sequence[str] | None = None,
    min_source_images: int = 50,
    device: str | None = None,
    log: Callable[[str], None] = print,
    progress_factory: Callable[[str, int], Any] | None = None,
) -> dict[str, Any]:
    """Audit a run for source shortcuts; writes out_dir/audit.json, audit.md and PNG plots. Returns the JSON.

    budget_minutes_per_model / loso_epochs: time budget and epochs of each model the audit trains (the
    source probe and every LOSO model); None keeps the recipe's value. lung_boxes: COCO file (default
    <data>/annotations/lung_boxes.coco.json). loso_sources: sources to hold out (default: every source
    with >= min_source_images images in the split). device: None keeps the recipe's (training) and
    picks cuda when available (evaluation). LOSO runs live in out_dir/loso/<source>/run and resume.
    audit.json is rewritten after each part.
    """
    run_dir, data_dir, split_csv, out_dir = Path(run_dir), Path(data_dir), Path(split_csv), Path(out_dir)
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise CXRError(f"unknown audit part(s) {', '.join(sorted(unknown))}; use {', '.join(PARTS)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    eval_device = pick_device(device or "auto")
    run = load_run(run_dir, device=eval_device)
    if run.config.get("kind", "classifier") != "classifier":
        raise CXRError("the audit needs a classifier run", run_dir)
    cfg = _recipe(run, budget_minutes=budget_minutes_per_model, epochs=loso_epochs, cache_dir=cache_dir, device=device)
    eval_cache = cache_dir if cache_dir is not None else (Path(cfg.cache_dir) if cfg.cache_dir else None)
    result: dict[str, Any] = {
        "meta": {
            "model": str(run_dir),
            "arch": run.arch,
            "weights_sha256": run.config.get("weights_sha256"),
            "data": str(data_dir),
            "manifest_sha256": file_sha256(manifest_csv(data_dir)),
            "split": str(split_csv),
            "split_sha256": file_sha256(split_csv),
            "subset": "test",
            "parts": [p for p in PARTS if p in parts],
            "seed": seed,
            "training_seed": cfg.seed,
            "n_boot": n_boot,
            "budget_minutes_per_model": budget_minutes_per_model,
            "loso_epochs": loso_epochs,
            "recipe": cfg.to_dict(),
            "preprocess": run.preprocess.to_dict(),
            "versions": package_versions(),
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        },
        "findings": [],
        "plots": [],
    }

    def save() -> None:
        (out_dir / "audit.json").write_text(json.dumps(result, indent=2, default=str))

    internal: dict[str, Any] | None = None
    if "per_source" in parts or "loso" in parts:
        log("evaluating the audited model on the test subset")
        ev = evaluate_run(
            run, data_dir, split_csv=split_csv, subset="test", n_boot=n_boot, seed=seed, cache_dir=eval_cache
        )
        (out_dir / "per_source_eval.json").write_text(json.dumps(ev, indent=2, default=str))
        internal = {s: _summary(r) for s, r in ev["per_source"].items()}
        if "per_source" in parts:
            single = [s for s, v in internal.items() if len(v["support"]) == 1]
            result["per_source"] = {
                "overall": _summary(ev),
                "sources": internal,
                "note": (
                    "A source with a single class (" + ", ".join(single) + ") can be scored perfectly by "
                    "recognising the source; its accuracy says nothing about the disease."
                )
                if single
                else "Every source in the test subset holds more than one class.",
            }
            accs = {s: v["accuracy"] for s, v in internal.items() if v["accuracy"] is not None}
            if accs:
                lo, hi = min(accs, key=accs.get), max(accs, key=accs.get)  # type: ignore[arg-type]
                result["findings"].append(
                    f"Per source, test accuracy runs from {accs[lo]:.2f} ({lo}) to {accs[hi]:.2f} ({hi})."
                )
            save()

    if "masking" in parts:
        path = Path(lung_boxes) if lung_boxes is not None else default_lung_boxes_path(data_dir)
        if not path.is_file():
            result["masking"] = {"skipped": f"no lung-box annotations at {path}"}
            result["findings"].append(f"Masking test skipped: no lung-box annotations at {path}.")
        else:
            log("masking test: lungs masked / lungs only")
            boxes = LungBoxes.from_coco(path)
            ms = masking_set(run, data_dir, split_csv, boxes, cache_dir=eval_cache)
            mk = masking_report(run, ms, n_boot=n_boot, seed=seed)
            mk.update({"lung_boxes": boxes.path, "lung_boxes_sha256": boxes.sha256, "atlas": boxes.atlas})
            result["masking"] = mk
            result["findings"].append(mk["finding"])
            if ms.data.labels.size:
                result["plots"].append(str(plot_masking(mk, out_dir / "masking.png")))
                result["plots"].append(str(plot_masking_examples(ms, out_dir / "masking_examples.png")))
        save()

    pool = _pool(data_dir, split_csv) if ("probe" in parts or "loso" in parts) else None
    if "probe" in parts:
        assert pool is not None
        log("source probe: training the recipe to name the source")
        pr = source_probe(cfg, data_dir, pool, out_dir / "probe", seed=seed, log=log)
        result["probe"] = pr
        result["findings"].append(pr["finding"])
        result["plots"].append(str(plot_probe(pr, out_dir / "probe.png")))
        save()

    if "loso" in parts:
        assert pool is not None and internal is not None
        counts = pool["source"].value_counts()
        if loso_sources is not None:
            missing = [s for s in loso_sources if s not in counts]
            if missing:
                raise CXRError(f"unknown source(s) {', '.join(missing)}; known: {', '.join(sorted(counts.index))}")
            chosen = list(loso_sources)
        else:
            chosen = sorted(s for s, n in counts.items() if n >= min_source_images)
        lo: dict[str, Any] = {
            "sources": {},
            "skipped": {
                s: f"{n} images, " + ("not chosen" if loso_sources is not None else f"fewer than {min_source_images}")
                for s, n in counts.items()
                if s not in chosen
            },
            "min_source_images": min_source_images,
            "note": (
                "Holding out a source that is the only source of a class (e.g. covid-cxnet is all covid, "
                "rsna all normal) means that class's test images come from a hospital the model never "
                "saw: the real question of external validity. A large gap says the internal figures "
                "lean on recognising the source. The held-out figures count only the source's own "
                "images; images of other sources linked to it by split_group also sit in the test set "
                "and are left out of them."
            ),
        }
        result["loso"] = lo
        for s in chosen:
            log(f"leave one source out: {s}")
            lo["sources"][s] = loso_one(
                cfg,
                data_dir,
                pool,
                s,
                out_dir / "loso" / _safe(s),
                internal,
                seed=seed,
                n_boot=n_boot,
                device=eval_device,
                cache_dir=eval_cache,
                log=log,
                progress_factory=progress_factory,
            )
            save()
        gaps = {s: e["gap"] for s, e in lo["sources"].items() if e.get("gap") is not None}
        big = {s: g for s, g in gaps.items() if g > 0.1}
        if big:
            result["findings"].append(
                "Held out, "
                + ", ".join(f"{s} loses {g:.2f} accuracy" for s, g in big.items())
                + " against the internal test: the internal figures do not carry over to "
                "an unseen hospital."
            )
        elif gaps:
            result["findings"].append("Held-out sources score within 0.1 of the internal test figures.")
        if lo["sources"]:
            result["plots"].append(str(plot_loso(lo, out_dir / "loso.png")))
        save()

    write_markdown(result, out_dir / "audit.md")
    save()
    log(f"wrote {out_dir / 'audit.json'} and {out_dir / 'audit.md'}")
    return result


__all__ = [
    "PARTS",
    "LungBoxes",
    "MaskingSet",
    "boxes_to_model",
    "lung_mask",
    "mask_image",
    "masking_set",
    "masking_report",
    "run_audit",
    "shortcut_verdict",
    "source_probe",
    "probe_figures",
    "loso_one",
]
