"""Leave one source out: the audited recipe retrained without each source and tested on it."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from cxrscreen import CLASSES
from cxrscreen.audit.masking import _summary
from cxrscreen.data.splits import read_split, split_source, write_split
from cxrscreen.errors import CXRError
from cxrscreen.evaluation.evaluate import evaluate_run
from cxrscreen.runs.run_dir import load_run
from cxrscreen.training.config import TrainConfig
from cxrscreen.training.train import train


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

