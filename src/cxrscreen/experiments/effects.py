"""Paired effects between arms on the same test images (bootstrap over patients): CLAHE on - off,
ImageNet - scratch, the best arm - VGG-16, a second seed - the first, for every figure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxrscreen.evaluation.metrics import grouped_bootstrap_ci
from cxrscreen.experiments.probs import read_test_probs


# ------------------------------------------------------------------------------------------- CLAHE effect
def _macro_f1(y: np.ndarray, pred: np.ndarray, n_classes: int) -> float:
    """Macro-F1 over all classes, 0 for a class with no true or predicted case (sklearn's zero_division=0)."""
    f1 = []
    for k in range(n_classes):
        tp = np.sum((pred == k) & (y == k))
        denom = np.sum(pred == k) + np.sum(y == k)
        f1.append(2 * tp / denom if denom else 0.0)
    return float(np.mean(f1))


def _auc(pos: np.ndarray, score: np.ndarray) -> float | None:
    """ROC AUC by ranks (ties count one half), None with a single class; equals sklearn's roc_auc_score."""
    from scipy.stats import rankdata

    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if not n_pos or not n_neg:
        return None
    ranks = rankdata(score)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


PAIRED_FIGURES = ("accuracy", "macro_f1", "covid_sensitivity", "covid_specificity", "covid_auc")


def _paired_effect(on: pd.DataFrame, off: pd.DataFrame, classes: list[str], n_boot: int,
                   seed: int) -> dict[str, Any]:
    """Bootstrap CIs (resampling split_group) of on - off on the same images, for every figure of
    `PAIRED_FIGURES` (arg-max decisions; COVID vs rest for sensitivity, specificity and AUC):
    ``{figure}_ci95`` and, from the same probabilities, ``{figure}_paired_diff``."""
    m = on.merge(off, on=["image", "label", "split_group"], suffixes=("_on", "_off"))
    if len(m) != len(on) or len(m) != len(off) or not len(m):
        return {"paired_images": int(len(m)), **{f"{f}_ci95": None for f in PAIRED_FIGURES},
                "note": "the two runs were not tested on the same images; no paired interval"}
    y = np.array([classes.index(v) for v in m["label"]])
    cols = [f"p_{c}" for c in classes]
    p_on, p_off = m[[c + "_on" for c in cols]].to_numpy(float), m[[c + "_off" for c in cols]].to_numpy(float)
    pred_on, pred_off = p_on.argmax(1), p_off.argmax(1)
    k, n = classes.index("covid"), len(classes)

    def figure(name: str, i: np.ndarray, pred: np.ndarray, p: np.ndarray) -> float | None:
        yi, pi = y[i], pred[i]
        if name == "accuracy":
            return float(np.mean(yi == pi))
        if name == "macro_f1":
            return _macro_f1(yi, pi, n)
        if name == "covid_auc":
            return _auc(yi == k, p[i, k])
        pos = (yi == k) if name == "covid_sensitivity" else (yi != k)
        if not pos.any():
            return None
        hit = (pi == k) if name == "covid_sensitivity" else (pi != k)
        return float(np.mean(hit[pos]))

    groups = list(m["split_group"])
    out: dict[str, Any] = {"paired_images": int(len(m))}
    every = np.arange(len(m))
    for name in PAIRED_FIGURES:
        def diff(i: np.ndarray, name: str = name) -> float | None:
            a, b = figure(name, i, pred_on, p_on), figure(name, i, pred_off, p_off)
            return None if a is None or b is None else a - b

        ci = grouped_bootstrap_ci(diff, groups, n_boot=n_boot, seed=seed)
        out[f"{name}_ci95"] = None if ci is None else list(ci)
        out[f"{name}_paired_diff"] = diff(every)
    return out


def _row_key(r: dict[str, Any], *drop: str) -> tuple[Any, ...]:
    """A run's arm without the named fields (arch, image_size, clahe, weights, seed)."""
    full = {"arch": r["arch"], "image_size": r["image_size"], "clahe": r["clahe"],
            "weights": r.get("weights", "none"), "seed": r.get("seed", 0)}
    return tuple(v for k, v in full.items() if k not in drop)


def _grouped(rows: list[dict[str, Any]], field: str, default: Any) -> dict[tuple[Any, ...], dict[Any, Any]]:
    """Runs grouped by their arm without `field`, each group keyed by the run's value of `field`."""
    by_key: dict[tuple[Any, ...], dict[Any, dict[str, Any]]] = {}
    for r in rows:
        by_key.setdefault(_row_key(r, field), {})[r.get(field, default)] = r
    return by_key


def _effect(a: dict[str, Any], b: dict[str, Any], out_dir: Path, n_boot: int, seed: int) -> dict[str, Any]:
    """a - b for every figure of `PAIRED_FIGURES`, with paired CIs (``note`` when one run has no result)."""
    entry: dict[str, Any] = {"a": a["name"], "b": b["name"]}
    if "metrics" not in a or "metrics" not in b:
        entry["note"] = "one of the two runs failed or was not evaluated"
        return entry
    ma, mb = a["metrics"], b["metrics"]
    for f in PAIRED_FIGURES:
        va, vb = (m[f]["value"] if isinstance(m[f], dict) else m[f] for m in (ma, mb))
        entry.update({f"{f}_a": va, f"{f}_b": vb, f"{f}_diff": None if va is None or vb is None else va - vb})
    try:
        entry.update(_paired_effect(read_test_probs(out_dir / a["files"]["probs"]),
                                    read_test_probs(out_dir / b["files"]["probs"]),
                                    list(ma["class_names"]), n_boot, seed))
    except (OSError, KeyError, ValueError) as exc:
        entry["note"] = f"no paired interval ({exc})"
    return entry


def transfer_effect(rows: list[dict[str, Any]], out_dir: Path, *, n_boot: int, seed: int) -> list[dict[str, Any]]:
    """Per (arch, size, CLAHE, seed) with both an ImageNet and a from-scratch run evaluated: ImageNet - scratch
    in every figure of `PAIRED_FIGURES`, paired CIs (keys ``{figure}_a`` ImageNet, ``_b`` scratch)."""
    out = []
    for (arch, size, clahe, run_seed), pair in _grouped(rows, "weights", "none").items():
        if "imagenet" in pair and "none" in pair:
            out.append({"arch": arch, "image_size": size, "clahe": clahe, "seed": run_seed,
                        **_effect(pair["imagenet"], pair["none"], out_dir, n_boot, seed)})
    return out


def best_vs(rows: list[dict[str, Any]], arch: str, out_dir: Path, *, n_boot: int, seed: int) -> dict[str, Any]:
    """The evaluated run with the highest COVID AUC against the best run of `arch` (paired CIs of best - arch);
    {} when `arch` has no evaluated run."""
    done = [r for r in rows if r["status"] == "ok" and r["metrics"]["covid_auc"]["value"] is not None]
    mine = [r for r in done if r["arch"] == arch]
    if not mine:
        return {}
    best = max(done, key=lambda r: r["metrics"]["covid_auc"]["value"])
    best_mine = max(mine, key=lambda r: r["metrics"]["covid_auc"]["value"])
    return {"best": best["name"], "arch_best": best_mine["name"],
            **({} if best is best_mine else _effect(best, best_mine, out_dir, n_boot, seed))}


def clahe_effect(rows: list[dict[str, Any]], out_dir: Path, *, n_boot: int, seed: int) -> list[dict[str, Any]]:
    """Per (arch, size, weights, seed) with both settings evaluated: CLAHE on - off in macro-F1 and COVID AUC
    (and every other figure of `PAIRED_FIGURES`), paired CIs."""
    out = []
    for (arch, size, weights, run_seed), pair in _grouped(rows, "clahe", None).items():
        if True not in pair or False not in pair:
            continue
        on, off = pair[True], pair[False]
        entry: dict[str, Any] = {"arch": arch, "image_size": size, "weights": weights, "seed": run_seed,
                                 "on": on["name"], "off": off["name"]}
        eff = _effect(on, off, out_dir, n_boot, seed)
        if "note" in eff and "macro_f1_a" not in eff:
            out.append({**entry, "note": eff["note"]})
            continue
        entry.update({
            "macro_f1_on": eff["macro_f1_a"], "macro_f1_off": eff["macro_f1_b"], "macro_f1_diff": eff["macro_f1_diff"],
            "covid_auc_on": eff["covid_auc_a"], "covid_auc_off": eff["covid_auc_b"],
            "covid_auc_diff": eff["covid_auc_diff"],
        })
        entry.update({k: v for k, v in eff.items() if k.endswith(("_ci95", "_paired_diff")) or k in
                      ("paired_images", "note")})
        entry.update({f"{f}_{s}": eff.get(f"{f}_{t}") for f in PAIRED_FIGURES for s, t in (("on", "a"), ("off", "b"))
                      if f not in ("macro_f1", "covid_auc")})
        out.append(entry)
    return out



def seed_effect(rows: list[dict[str, Any]], out_dir: Path, *, base_seed: int, n_boot: int,
                seed: int) -> list[dict[str, Any]]:
    """Per arm trained with another seed as well as `base_seed`: other - base in every figure of
    `PAIRED_FIGURES`, paired CIs (keys ``{figure}_a`` the other seed, ``_b`` the base seed). How far training
    alone moves a figure, to set beside the CLAHE and transfer effects, whose arms are one run each."""
    out = []
    for (arch, size, clahe, weights), by_seed in _grouped(rows, "seed", 0).items():
        if base_seed not in by_seed:
            continue
        for other in sorted(s for s in by_seed if s != base_seed):
            out.append({"arch": arch, "image_size": size, "clahe": clahe, "weights": weights, "seed_a": other,
                        "seed_b": base_seed, **_effect(by_seed[other], by_seed[base_seed], out_dir, n_boot, seed)})
    return out
