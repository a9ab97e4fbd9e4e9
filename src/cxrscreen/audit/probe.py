"""The source probe: can a model with the audited recipe tell which hospital an image comes from?"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import confusion_matrix, f1_score
from torch import nn
from torch.utils.data import DataLoader

from cxrscreen import CLASSES
from cxrscreen.audit.masking import _chance
from cxrscreen.data.dataset import XRayTensorDataset
from cxrscreen.data.manifest import read_manifest
from cxrscreen.data.splits import read_split, split_grouped, write_split
from cxrscreen.data.subsets import SubsetData, load_subset
from cxrscreen.engine.loop import EpochLoop
from cxrscreen.engine.setup import pick_device, seed_everything
from cxrscreen.engine.validation import predict_logits
from cxrscreen.errors import CXRError
from cxrscreen.models.registry import create_model
from cxrscreen.runs.run_dir import LoadedRun
from cxrscreen.training.classification import classifier_recipe
from cxrscreen.training.config import TrainConfig
from cxrscreen.transforms.augment import eval_transform
from cxrscreen.transforms.cache import PreprocessedCache, default_cache_dir


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
    """Train cfg's architecture and preprocessing to predict `source` on a grouped split; test figures.

    The classifier recipe and the one epoch loop (in memory: the weights of the lowest val loss are kept).
    """
    split = split_grouped(pool, seed=seed, test_frac=0.2, val_frac=0.1)
    split_csv = write_split(split, Path(out_dir) / "split.csv")
    cache = PreprocessedCache(cfg.preprocess, Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir())
    sets = {s: load_subset(Path(data_dir), split_csv, s, cache, list(CLASSES)) for s in ("train", "val", "test")}
    sources = sorted(set(pool["source"]))
    y = {k: np.array([sources.index(s) for s in v.sources], dtype=np.int64) for k, v in sets.items()}
    if len(y["train"]) == 0 or len(y["test"]) == 0:
        raise CXRError("the probe split has no train or no test images", split_csv)

    cfg = dataclasses.replace(cfg, monitor="val_loss")  # the probe keeps the epoch of the lowest val loss
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    model = create_model(cfg.arch, num_classes=len(sources), in_chans=1, weights=cfg.weights).to(device)
    generator = torch.Generator().manual_seed(cfg.seed)
    recipe = classifier_recipe(cfg, model, (sets["train"].images, y["train"]), (sets["val"].images, y["val"]),
                               num_classes=len(sources), device=device, generator=generator)
    loop = EpochLoop(cfg, recipe, generator, device, has_val=len(y["val"]) > 0, name="probe ", log=log)
    done = loop.run()
    history = [{k: r[k] for k in ("epoch", "train_loss", "val_loss", "train_images")} for r in done["history"]]
    probs = run_probabilities_of(model, sets["test"].images, cfg, device)
    return probe_figures(y["test"], probs.argmax(1), sources, sets, history, seconds=done["train_seconds"])


def run_probabilities_of(model: nn.Module, images: np.ndarray, cfg: TrainConfig, device: torch.device
                         ) -> np.ndarray:
    """Softmax probabilities of a freshly trained classifier on preprocessed uint8 images."""
    loader = DataLoader(XRayTensorDataset(images, np.zeros(len(images), np.int64), eval_transform(cfg.preprocess)),
                        batch_size=max(cfg.batch_size, 64))
    logits, _ = predict_logits(model, loader, device=device)
    return torch.softmax(torch.from_numpy(logits), 1).numpy()


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

