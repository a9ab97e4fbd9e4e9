"""The study's model comparison: train every (architecture, CLAHE on/off) pair, evaluate, time, report.

`run_compare(config_yaml, data_dir, split_csv, out_dir)` trains each pair listed in the YAML into
out_dir/runs/<arch>_<size>_clahe-on|off with `training.train` (a finished run is not trained again, an
interrupted one continues from its checkpoint), evaluates it on the split's test subset
(runs/<name>/eval/test.json and per-image probabilities in runs/<name>/eval/test_probs.csv), measures
inference images/s on this machine, and writes the report (see `report.py`) and compare.json.

One failing pair is recorded as failed, with its error, and the others go on.

A comparison YAML may start from another: ``base: other.yaml`` (a path relative to the file) merges the
other file under this one; this file's top-level keys replace the base's whole (a ``train:`` here replaces
the base's ``train:``, it is not merged key by key). The report's verbatim config shows both files.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import platform
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml

from cxrscreen import CLASSES
from cxrscreen.data.manifest import manifest_csv, read_manifest
from cxrscreen.data.splits import PAPER_COUNTS, read_split
from cxrscreen.data.subsets import SubsetData, load_subset
from cxrscreen.engine.setup import pick_device
from cxrscreen.errors import CXRError
from cxrscreen.evaluation.evaluate import evaluate_subset, run_probabilities
from cxrscreen.evaluation.metrics import grouped_bootstrap_ci
from cxrscreen.experiments.report import read_test_probs, write_test_probs
from cxrscreen.io.files import file_sha256, write_json
from cxrscreen.models.registry import available_models, count_parameters, get_spec, resolve_image_size
from cxrscreen.runs.provenance import provenance, utc_now
from cxrscreen.runs.run_dir import HISTORY_FILE, LoadedRun, load_run, read_config, read_history, write_config
from cxrscreen.training.config import TrainConfig
from cxrscreen.training.train import train
from cxrscreen.transforms.cache import PreprocessedCache, default_cache_dir

# The study's own figures: reported, never rerun here (its data and test set are not ours).
STUDY_REFERENCE: dict[str, Any] = {
    "name": "study (reported)",
    "arch": "ssd300_vgg16",
    "image_size": 300,
    "accuracy": None,
    "macro_f1": None,
    "covid_sensitivity": 0.9492,
    "covid_specificity": 0.9200,
    "covid_auc": None,
    "train_counts": dict(PAPER_COUNTS["train"]),
    "test_counts": dict(PAPER_COUNTS["test"]),
    "source": "reported by the study, not rerun",
    "note": (
        "SSD300-VGG16 on the study's own data (train {tr}; test {te}, covid/normal/pneumonia); "
        "accuracy not given; not comparable image for image with the rows above"
    ).format(
        tr="/".join(str(PAPER_COUNTS["train"][c]) for c in CLASSES),
        te="/".join(str(PAPER_COUNTS["test"][c]) for c in CLASSES),
    ),
}

BASE_KEY = "base"  # a comparison YAML's `base: other.yaml` (see the module doc)
TOP_LEVEL_KEYS = ("title", "models", "train", "clahe", "seed", "budget_minutes", "n_boot", "inference", "gpu_recipe")
# TrainConfig fields that change how a run is executed, not what it learns: a run may resume with new values.
OPERATIONAL_FIELDS = ("budget_minutes", "cache_dir", "device", "threads", "num_workers")
PROBS_FILE = "test_probs.csv"
EVAL_FILE = "test.json"
INFERENCE_FILE = "inference.json"


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> tuple[Any, str]:
    """A comparison YAML with its ``base:`` file (recursively) merged under it: (mapping, text), the text being
    the file's own followed by its base's."""
    try:
        text = path.read_text()
        data = yaml.safe_load(text) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise CXRError(f"cannot read comparison config ({exc})", path) from exc
    if not isinstance(data, dict) or BASE_KEY not in data:
        return data, text
    base = path.parent / str(data.pop(BASE_KEY))
    seen = (*seen, path.resolve())
    if base.resolve() in seen:
        raise CXRError(f"`{BASE_KEY}: {base.name}` leads back to a file that names it as its base", path)
    base_data, base_text = _read_yaml(base, seen)
    if not isinstance(base_data, dict):
        raise CXRError("the comparison config must be a mapping", base)
    return {**base_data, **data}, f"{text.rstrip()}\n\n# ---- {base} ({BASE_KEY} of the above) ----\n{base_text}"


@dataclass
class ModelEntry:
    """One `models:` entry: an architecture, its input size (None: the registry's default) and overrides."""

    arch: str
    image_size: int | None = None
    overrides: dict[str, Any] = field(default_factory=dict)

    def size(self) -> int:
        """The input size (the registry's default when not given; CXRError for an unknown architecture)."""
        return resolve_image_size(self.arch, configured=self.image_size)


@dataclass
class CompareConfig:
    """The comparison recipe read from YAML (`text` keeps the file verbatim for the report)."""

    models: list[ModelEntry]
    train: dict[str, Any] = field(default_factory=dict)
    clahe: list[bool] = field(default_factory=lambda: [True, False])
    seed: int = 0
    budget_minutes: float | None = None
    n_boot: int = 1000
    inference: dict[str, int] = field(default_factory=lambda: {"batch_size": 32, "images": 96})
    gpu_recipe: dict[str, Any] | None = None
    title: str = "Model comparison"
    text: str = ""
    path: str | None = None

    @classmethod
    def from_yaml(cls, path: Path) -> CompareConfig:
        """Read and validate a comparison YAML (and its ``base:``); CXRError naming the file on any problem."""
        data, text = _read_yaml(Path(path))
        try:
            cfg = cls.from_dict(data, text=text)
        except CXRError as exc:
            raise CXRError(exc.problem, path) from exc
        cfg.path = str(path)
        return cfg

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, text: str = "") -> CompareConfig:
        """Build from a parsed YAML mapping; every entry is checked by building its TrainConfig."""
        if not isinstance(data, dict):
            raise CXRError("the comparison config must be a mapping")
        unknown = set(data) - set(TOP_LEVEL_KEYS)
        if unknown:
            raise CXRError(f"unknown keys {', '.join(sorted(unknown))}; known: {', '.join(TOP_LEVEL_KEYS)}")
        raw_models = data.get("models") or []
        if not isinstance(raw_models, list) or not raw_models:
            raise CXRError("`models:` must list at least one entry (arch, image_size, overrides)")
        models = []
        for i, m in enumerate(raw_models, 1):
            if isinstance(m, str):
                m = {"arch": m}
            if not isinstance(m, dict) or not m.get("arch"):
                raise CXRError(f"models entry {i} needs an `arch`")
            m = dict(m)
            arch = str(m.pop("arch"))
            size = m.pop("image_size", None)
            bad = set(m) - (set(TrainConfig.__dataclass_fields__) - {"arch"})
            if bad:
                raise CXRError(f"models entry {i} ({arch}): unknown option(s) {', '.join(sorted(bad))}")
            models.append(ModelEntry(arch=arch, image_size=None if size is None else int(size), overrides=m))
        clahe = data.get("clahe", [True, False])
        clahe = clahe if isinstance(clahe, list) else [clahe]
        if not clahe or any(not isinstance(c, bool) for c in clahe) or len(set(clahe)) != len(clahe):
            raise CXRError(f"`clahe:` must list true and/or false once each, got {data.get('clahe')!r}")
        train_d = data.get("train") or {}
        if not isinstance(train_d, dict):
            raise CXRError("`train:` must be a mapping of TrainConfig options")
        inference = {"batch_size": 32, "images": 96, **(data.get("inference") or {})}
        budget = data.get("budget_minutes")
        cfg = cls(
            models=models,
            train=train_d,
            clahe=clahe,
            seed=int(data.get("seed", train_d.get("seed", 0))),
            budget_minutes=None if budget in (None, 0) else float(budget),
            n_boot=int(data.get("n_boot", 1000)),
            inference={k: int(v) for k, v in inference.items()},
            gpu_recipe=data.get("gpu_recipe"),
            title=str(data.get("title", "Model comparison")),
            text=text,
        )
        names = [cfg.run_name(e, c) for e in models for c in clahe]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise CXRError(f"two entries give the same run name: {', '.join(dup)}")
        for e in models:
            if e.arch not in available_models():
                continue  # an unknown architecture is recorded as a failed row when the comparison runs
            try:
                train_config_for(cfg, e, clahe[0], size=e.size())
            except (CXRError, TypeError, ValueError) as exc:
                raise CXRError(f"models entry {e.arch}: {exc}") from exc
        return cfg

    def run_name(self, entry: ModelEntry, clahe: bool) -> str:
        """runs/ folder name of a pair; 'default' stands for the size of an unknown architecture."""
        try:
            size: int | str = entry.size()
        except CXRError:
            size = "default"
        return run_name(entry.arch, size, clahe, weights=self.weights_of(entry), seed=self.seed_of(entry),
                        base_seed=self.seed)

    def weights_of(self, entry: ModelEntry) -> str:
        """The entry's starting weights: "imagenet" or "none"."""
        return str(entry.overrides.get("weights", self.train.get("weights", "none")) or "none")

    def seed_of(self, entry: ModelEntry) -> int:
        """The entry's training seed (the config's unless the entry sets its own)."""
        return int(entry.overrides.get("seed", self.seed))

    def with_gpu_recipe(self) -> CompareConfig:
        """A copy with `gpu_recipe` applied: its `train:` options and per-architecture `image_size`."""
        if not self.gpu_recipe:
            raise CXRError("the comparison config has no gpu_recipe section")
        new = copy.deepcopy(self)
        recipe = dict(self.gpu_recipe)
        sizes = recipe.get("image_size") or {}
        new.train = _merge(new.train, recipe.get("train") or {})
        if "budget_minutes" in recipe:
            new.budget_minutes = recipe["budget_minutes"]
        for e in new.models:
            if e.arch in sizes:
                e.image_size = int(sizes[e.arch])
            for k in set(e.overrides) & set(recipe.get("train") or {}):
                del e.overrides[k]  # the GPU recipe's options win over the CPU entries' own
        return new


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """base updated by over; `preprocess` and `augment` mappings are merged key by key."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if k in ("preprocess", "augment") and isinstance(v, dict):
            out[k] = {**(out.get(k) or {}), **v}
        else:
            out[k] = copy.deepcopy(v)
    return out


def run_name(arch: str, image_size: int | str, clahe: bool, *, weights: str = "none", seed: int = 0,
             base_seed: int = 0) -> str:
    """'<arch>_<size>[_imagenet][_seed<n>]_clahe-on' (or '-off'): '_imagenet' for ImageNet starting weights,
    '_seed<n>' when the entry's seed differs from the config's (so one config can hold both arms)."""
    tags = ("_imagenet" if weights == "imagenet" else "") + (f"_seed{seed}" if seed != base_seed else "")
    return f"{arch}_{image_size}{tags}_clahe-{'on' if clahe else 'off'}"


def train_config_for(
    cc: CompareConfig,
    entry: ModelEntry,
    clahe: bool,
    *,
    size: int | None = None,
    budget_minutes: float | None = None,
    cache_dir: Path | str | None = None,
    device: str | None = None,
) -> TrainConfig:
    """The TrainConfig of one pair: train defaults < seed / budget of the config < entry < CLAHE, size, CLI."""
    d = _merge(cc.train, {"seed": cc.seed})
    if cc.budget_minutes is not None:
        d["budget_minutes"] = cc.budget_minutes
    d = _merge(d, entry.overrides)
    d["arch"] = entry.arch
    d["preprocess"] = {**(d.get("preprocess") or {}), "image_size": size or entry.size(), "clahe": clahe}
    if budget_minutes is not None:
        d["budget_minutes"] = budget_minutes if budget_minutes > 0 else None
    if cache_dir is not None:
        d["cache_dir"] = str(cache_dir)
    if device is not None:
        d["device"] = device
    return TrainConfig.from_dict(d)


# ------------------------------------------------------------------------------------------- per run
def inference_timing(run: LoadedRun, images: np.ndarray, *, batch_size: int = 32,
                     n_images: int = 96) -> dict[str, float]:
    """Time `run_probabilities` on preprocessed uint8 images (N, S, S) held in memory.

    The images are repeated or cut to `n_images`; one batch runs first as a warm-up, untimed. Returns
    images_per_s (wall clock), images_per_cpu_s (per second of this process's CPU time), wall_s, cpu_s and
    cpu_share (CPU time / (wall time x torch threads): well below 1 when other processes took the cores).
    """
    if len(images) == 0:
        raise CXRError("no images to time inference on")
    reps = -(-n_images // len(images))
    pool = np.concatenate([images] * reps)[:n_images] if reps > 1 else images[:n_images]
    run_probabilities(run, pool[:batch_size], batch_size=batch_size)
    t0, c0 = time.perf_counter(), time.process_time()
    run_probabilities(run, pool, batch_size=batch_size)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"images_per_s": len(pool) / wall, "images_per_cpu_s": len(pool) / cpu if cpu > 0 else float("nan"),
            "wall_s": wall, "cpu_s": cpu, "cpu_share": cpu / (wall * torch.get_num_threads())}


def machine_info(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Where timings were taken: host, CPU, threads, device, load average."""
    dev = torch.device(device)
    return {
        "host": platform.node(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def evaluate_test(
    run: LoadedRun, data_dir: Path, split_csv: Path, *, n_boot: int, seed: int, cache_dir: Path | None = None
) -> tuple[dict[str, Any], SubsetData, np.ndarray]:
    """`evaluate_run(run, data_dir, split_csv=..., subset="test")`'s JSON, plus the test images and the
    probabilities it was computed from, in one pass of the model (the same figures, bootstrap and meta)."""
    out, data, probs = evaluate_subset(run, data_dir, split_csv=split_csv, subset="test", n_boot=n_boot, seed=seed,
                                       cache_dir=cache_dir)
    out["meta"]["written_by"] = (
        "cxrscreen.compare.evaluate_test (evaluate_run's figures; probabilities in test_probs.csv)"
    )
    return out, data, probs


def _training_matches(run_dir: Path, cfg: TrainConfig) -> tuple[dict[str, Any] | None, set[str]]:
    """(stored config.json or None, training fields that differ from cfg)."""
    if not (run_dir / "config.json").is_file():
        return None, set()
    old = read_config(run_dir)
    stored, new = old.get("training") or {}, cfg.to_dict()
    with contextlib.suppress(CXRError, TypeError, ValueError):  # as TrainConfig writes it now: a field
        stored = TrainConfig.from_dict(stored).to_dict()  # added since takes its default, a retired one goes
    return old, {k for k in set(stored) | set(new) if stored.get(k) != new.get(k)}


def _train_or_resume(cfg: TrainConfig, data_dir: Path, split_csv: Path, run_dir: Path, *,
                     log: Callable[[str], None], progress_factory: Callable[[str, int], Any] | None) -> bool:
    """Train, resume or skip a run; returns True when training ran in this call.

    A stored run whose training options differ only in OPERATIONAL_FIELDS (budget, cache, device,
    threads, workers) is the same run: skipped when finished, resumed with the new values otherwise.
    """
    old, diff = _training_matches(run_dir, cfg)
    if old is not None and diff and diff <= set(OPERATIONAL_FIELDS):
        if old.get("finished"):
            log(f"{run_dir}: finished run found (differs only in {', '.join(sorted(diff))}), not training again")
            return False
        log(f"{run_dir}: resuming with new {', '.join(sorted(diff))}")
        write_config(run_dir, {**old, "training": cfg.to_dict()})
    elif old is not None and not diff and old.get("finished"):
        log(f"{run_dir}: finished run found, not training again")
        return False
    train(cfg, data_dir, split_csv, run_dir, log=log, progress_factory=progress_factory)
    return True


def _eval_is_current(ev_path: Path, probs_path: Path, config: dict[str, Any], manifest_sha: str, split_sha: str,
                     n_boot: int, seed: int) -> dict[str, Any] | None:
    """The stored eval JSON when it was made from these weights, data, split and bootstrap; else None."""
    if not (ev_path.is_file() and probs_path.is_file()):
        return None
    try:
        ev = json.loads(ev_path.read_text())
    except json.JSONDecodeError:
        return None
    m = ev.get("meta") or {}
    temperature = float((config.get("calibration") or {}).get("temperature", 1.0))
    same = (m.get("weights_sha256") == config.get("weights_sha256") and m.get("manifest_sha256") == manifest_sha
            and m.get("split_sha256") == split_sha and (m.get("bootstrap") or {}).get("n") == n_boot
            and (m.get("bootstrap") or {}).get("seed") == seed and m.get("temperature") == temperature
            and m.get("covid_threshold") == (config.get("operating_point") or {}).get("threshold"))
    return ev if same else None


def _metrics(ev: dict[str, Any]) -> dict[str, Any]:
    """The headline figures of an eval JSON, values copied unchanged."""
    c = ev["covid_vs_rest"]
    return {
        "n_test": ev["n"],
        "accuracy": ev["accuracy"],
        "macro_f1": ev["macro_f1"],
        "covid_sensitivity": c["sensitivity"],
        "covid_specificity": c["specificity"],
        "covid_auc": c["auc"],
        "confusion_matrix": ev["confusion_matrix"],
        "class_names": ev["class_names"],
    }


def compare_one(
    cc: CompareConfig,
    entry: ModelEntry,
    clahe: bool,
    data_dir: Path,
    split_csv: Path,
    runs_dir: Path,
    *,
    manifest_sha: str,
    split_sha: str,
    budget_minutes: float | None = None,
    cache_dir: Path | None = None,
    device: str | None = None,
    log: Callable[[str], None] = print,
    progress_factory: Callable[[str, int], Any] | None = None,
) -> dict[str, Any]:
    """Train (or resume / skip), evaluate and time one pair. Never raises for the pair's own failures."""
    name = cc.run_name(entry, clahe)
    run_dir = runs_dir / name
    row: dict[str, Any] = {"name": name, "arch": entry.arch, "image_size": entry.image_size, "clahe": clahe,
                           "weights": cc.weights_of(entry), "seed": cc.seed_of(entry),
                           "kind": None, "status": "failed", "stage": "config", "error": None,
                           "run_dir": str(Path("runs") / name), "trained_now": False}
    t0 = time.monotonic()
    try:
        row["image_size"] = entry.size()
        row["kind"] = get_spec(entry.arch).kind
        cfg = train_config_for(cc, entry, clahe, budget_minutes=budget_minutes, cache_dir=cache_dir, device=device)
        row["training"] = cfg.to_dict()
        row["stage"] = "train"
        row["trained_now"] = _train_or_resume(cfg, data_dir, split_csv, run_dir, log=log,
                                              progress_factory=progress_factory)
        config = read_config(run_dir)
        if not config.get("finished"):
            raise CXRError("training did not finish", run_dir)
        hist = read_history(run_dir / HISTORY_FILE)
        row.update({
            "parameters": config.get("parameters"),
            "train_seconds": config.get("train_seconds"),
            "epochs_run": int(len(hist)),
            "epoch_seconds_sum": float(hist["seconds"].sum()) if "seconds" in hist else None,
            "best_epoch": config.get("best_epoch"),
            "stop_reason": config.get("stop_reason"),
            "weights_sha256": config.get("weights_sha256"),
        })

        row["stage"] = "evaluate"
        eval_dir = run_dir / "eval"
        ev_path, probs_path, inf_path = eval_dir / EVAL_FILE, eval_dir / PROBS_FILE, eval_dir / INFERENCE_FILE
        ev = _eval_is_current(ev_path, probs_path, config, manifest_sha, split_sha, cc.n_boot, cc.seed)
        run: LoadedRun | None = None
        images: np.ndarray | None = None
        eval_cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
        dev = pick_device(cfg.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)  # as in training, whether or not training ran in this call
        if ev is None:
            log(f"{name}: evaluating on the test subset")
            run = load_run(run_dir, device=dev)
            ev, data, probs = evaluate_test(run, data_dir, split_csv, n_boot=cc.n_boot, seed=cc.seed,
                                            cache_dir=eval_cache)
            write_test_probs(probs_path, data.paths, data.labels, data.groups, data.sources, probs, run.classes)
            images = data.images
            ev_path.parent.mkdir(parents=True, exist_ok=True)
            write_json(ev_path, ev)
        else:
            log(f"{name}: test evaluation is current, reused")
        row["metrics"] = _metrics(ev)
        row["files"] = {"eval": str(ev_path.relative_to(runs_dir.parent)),
                        "probs": str(probs_path.relative_to(runs_dir.parent)),
                        "history": str((run_dir / HISTORY_FILE).relative_to(runs_dir.parent))}

        row["stage"] = "inference"
        batch, n_img = cc.inference.get("batch_size", 32), cc.inference.get("images", 96)
        key = {"host": platform.node(), "torch_threads": torch.get_num_threads(), "device": str(dev),
               "batch_size": batch, "images": n_img, "weights_sha256": config.get("weights_sha256")}
        old_inf = json.loads(inf_path.read_text()) if inf_path.is_file() else {}
        if all(old_inf.get(k) == v for k, v in key.items()):
            row["inference"] = old_inf
        else:
            run = run or load_run(run_dir, device=dev)
            if images is None:
                images = load_subset(data_dir, split_csv, "test", PreprocessedCache(run.preprocess, eval_cache),
                                     run.classes).images
            log(f"{name}: timing inference ({n_img} images, batch {batch})")
            timing = inference_timing(run, images, batch_size=batch, n_images=n_img)
            row["inference"] = {**key, **{k: round(v, 3) for k, v in timing.items()}, "machine": machine_info(dev),
                                "measured": utc_now()}
            write_json(inf_path, row["inference"])
        if row.get("parameters") is None and run is not None:
            row["parameters"] = count_parameters(run.model)
        row.update(status="ok", stage=None)
    except Exception as exc:  # one failing model must not stop the comparison
        row["error"] = f"{type(exc).__name__}: {exc}"
        log(f"{name} failed during {row['stage']}: {row['error']}")
    row["wall_seconds"] = round(time.monotonic() - t0, 1)
    return row


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
    by_key: dict[tuple[Any, ...], dict[str, dict[str, Any]]] = {}
    for r in rows:
        by_key.setdefault(_row_key(r, "weights"), {})[r.get("weights", "none")] = r
    out = []
    for (arch, size, clahe, run_seed), pair in by_key.items():
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
    by_key: dict[tuple[Any, ...], dict[bool, dict[str, Any]]] = {}
    for r in rows:
        by_key.setdefault(_row_key(r, "clahe"), {})[r["clahe"]] = r
    out = []
    for (arch, size, weights, run_seed), pair in by_key.items():
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


def pending_runs(cc: CompareConfig, rows: list[dict[str, Any]]) -> list[str]:
    """Run names the config lists that have no row yet (not run, or interrupted before they finished)."""
    done = {r["name"] for r in rows}
    return [n for n in (cc.run_name(e, c) for e in cc.models for c in cc.clahe) if n not in done]


def study_analyses(result: dict[str, Any], cc: CompareConfig, out_dir: Path) -> None:
    """Fill result's clahe_effect, transfer_effect, vgg16_vs_best and pending from its runs (in place)."""
    rows, n_boot, seed = result["runs"], cc.n_boot, cc.seed
    result["clahe_effect"] = clahe_effect(rows, out_dir, n_boot=n_boot, seed=seed)
    result["transfer_effect"] = transfer_effect(rows, out_dir, n_boot=n_boot, seed=seed)
    result["vgg16_vs_best"] = best_vs(rows, "vgg16", out_dir, n_boot=n_boot, seed=seed)
    result["pending"] = pending_runs(cc, rows)


def report_finished(out_dir: Path, config: Path | CompareConfig, *, gpu_recipe: bool = False) -> dict[str, Any]:
    """The report of the runs a (possibly still running or interrupted) comparison has finished.

    Reads out_dir/compare.json (written after every run), recomputes the paired analyses from the finished
    runs, lists the config's other runs as not run yet, and writes the report and compare.json (``complete``
    stays false while any run is pending). Trains nothing.
    """
    cc = config if isinstance(config, CompareConfig) else CompareConfig.from_yaml(Path(config))
    if gpu_recipe:
        cc = cc.with_gpu_recipe()
    out_dir = Path(out_dir)
    path = out_dir / "compare.json"
    if not path.is_file():
        raise CXRError("no compare.json: run `cxrscreen compare` first", path)
    result = json.loads(path.read_text())
    study_analyses(result, cc, out_dir)
    result["meta"]["report_written"] = utc_now()
    from cxrscreen.experiments.report import write_report

    result["table"], result["files"] = write_report(result, out_dir)
    result["complete"] = not result["pending"]
    write_json(path, result)
    return result


# ------------------------------------------------------------------------------------------- driver
def default_command(config: Path | str | None, data_dir: Path, split_csv: Path, out_dir: Path,
                    budget_minutes: float | None) -> str:
    """The `cxrscreen compare` command line equivalent to a library call."""
    args = ["cxrscreen", "compare", "--config", str(config), "--data", str(data_dir), "--split", str(split_csv),
            "--out", str(out_dir)]
    if budget_minutes is not None:
        args += ["--budget-minutes", str(budget_minutes)]
    return shlex.join(args)


def run_compare(
    config: Path | CompareConfig,
    data_dir: Path,
    split_csv: Path,
    out_dir: Path,
    *,
    budget_minutes: float | None = None,
    cache_dir: Path | None = None,
    device: str | None = None,
    gpu_recipe: bool = False,
    command: str | None = None,
    log: Callable[[str], None] = print,
    progress_factory: Callable[[str, int], Any] | None = None,
) -> dict[str, Any]:
    """Run the comparison and write the report into out_dir; returns compare.json's content.

    budget_minutes: minutes per pair, overriding the config's (<= 0: no budget). cache_dir / device
    override the recipe's. gpu_recipe: apply the config's `gpu_recipe` section. command: the command
    line recorded in the report (default: the equivalent `cxrscreen compare` call).
    """
    cc = config if isinstance(config, CompareConfig) else CompareConfig.from_yaml(Path(config))
    if gpu_recipe:
        cc = cc.with_gpu_recipe()
    data_dir, split_csv, out_dir = Path(data_dir), Path(split_csv), Path(out_dir)
    read_manifest(data_dir)
    split = read_split(split_csv)
    if not (split["subset"] == "test").any():
        raise CXRError("the split has no test images", split_csv)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs_dir = out_dir / "runs"
    manifest_sha, split_sha = file_sha256(manifest_csv(data_dir)), file_sha256(split_csv)
    result: dict[str, Any] = {
        "meta": {
            "title": cc.title,
            "config_path": cc.path,
            "config_text": cc.text,
            "gpu_recipe_applied": gpu_recipe,
            "gpu_recipe": cc.gpu_recipe,
            "seed": cc.seed,
            "clahe": cc.clahe,
            "budget_minutes_per_run": budget_minutes if budget_minutes is not None else cc.budget_minutes,
            "n_boot": cc.n_boot,
            "inference": cc.inference,
            "data": {"manifest": str(data_dir), "manifest_sha256": manifest_sha, "split": str(split_csv),
                     "split_sha256": split_sha,
                     "subset_images": {s: int((split["subset"] == s).sum()) for s in ("train", "val", "test")}},
            **provenance(command=command or default_command(cc.path, data_dir, split_csv, out_dir, budget_minutes),
                         machine=machine_info(pick_device(device or "auto")), started=utc_now()),
        },
        "runs": [],
        "reference": STUDY_REFERENCE,
        "complete": False,
    }
    pairs = [(e, c) for e in cc.models for c in cc.clahe]
    for i, (entry, clahe) in enumerate(pairs, 1):
        log(f"[{i}/{len(pairs)}] {cc.run_name(entry, clahe)}")
        row = compare_one(cc, entry, clahe, data_dir, split_csv, runs_dir, manifest_sha=manifest_sha,
                          split_sha=split_sha, budget_minutes=budget_minutes, cache_dir=cache_dir, device=device,
                          log=log, progress_factory=progress_factory)
        result["runs"].append(row)
        write_json(out_dir / "compare.json", result)
    study_analyses(result, cc, out_dir)
    result["meta"]["finished"] = utc_now()
    from cxrscreen.experiments.report import write_report

    result["table"], result["files"] = write_report(result, out_dir)
    result["complete"] = True
    write_json(out_dir / "compare.json", result)
    n_failed = sum(r["status"] != "ok" for r in result["runs"])
    log(f"wrote {out_dir / 'report.html'} ({len(pairs) - n_failed} of {len(pairs)} runs ok)")
    return result

