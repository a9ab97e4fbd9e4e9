"""The study's model comparison: train every (architecture, CLAHE on/off) pair, evaluate, time, report.

`run_compare(config_yaml, data_dir, split_csv, out_dir)` trains each pair listed in the YAML into
out_dir/runs/<arch>_<size>_clahe-on|off with `training.train` (a finished run is not trained again, an
interrupted one continues from its checkpoint), evaluates it on the split's test subset
(runs/<name>/eval/test.json and per-image probabilities in runs/<name>/eval/test_probs.csv), measures
inference images/s on this machine, and writes the report (see `report.py`) and compare.json.

One failing pair is recorded as failed, with its error, and the others go on.

Several processes may work on one out_dir at once (one per core, or per machine on a shared disk): each
takes an arm only while it holds that arm's lock (runs/.locks/<name>.lock, an flock the system frees when the
process ends, however it ends) and skips arms another process holds; compare.json is rewritten under a lock
of its own, merging this process's rows with those already there, so the report lists every finished arm
whichever process trained it. `only` (fnmatch patterns on run names) restricts a call to some arms.

A comparison YAML may start from another: ``base: other.yaml`` (a path relative to the file) merges the
other file under this one; this file's top-level keys replace the base's whole (a ``train:`` here replaces
the base's ``train:``, it is not merged key by key). The report's verbatim config shows both files.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import json
import os
import platform
import shlex
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxrscreen.data.manifest import manifest_csv, read_manifest
from cxrscreen.data.splits import read_split
from cxrscreen.data.subsets import SubsetData, load_subset
from cxrscreen.engine.setup import pick_device
from cxrscreen.errors import CXRError
from cxrscreen.evaluation.evaluate import evaluate_subset, run_probabilities
from cxrscreen.experiments.config import (
    OPERATIONAL_FIELDS,
    STUDY_REFERENCE,
    CompareConfig,
    ModelEntry,
    train_config_for,
)
from cxrscreen.experiments.probs import write_test_probs
from cxrscreen.experiments.report import study_analyses, write_report
from cxrscreen.io.files import file_sha256, write_json
from cxrscreen.models.registry import count_parameters, get_spec
from cxrscreen.runs.provenance import provenance, utc_now
from cxrscreen.runs.run_dir import HISTORY_FILE, LoadedRun, load_run, read_config, read_history, write_config
from cxrscreen.training.config import TrainConfig
from cxrscreen.training.train import train
from cxrscreen.transforms.cache import PreprocessedCache, default_cache_dir

PROBS_FILE = "test_probs.csv"
EVAL_FILE = "test.json"
INFERENCE_FILE = "inference.json"


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


def _training_diff(stored: dict[str, Any], cfg: TrainConfig) -> set[str]:
    """The training fields in which stored options (as TrainConfig writes them now: a field added since takes its
    default, a retired one goes) differ from cfg."""
    with contextlib.suppress(CXRError, TypeError, ValueError):
        stored = TrainConfig.from_dict(stored).to_dict()
    new = cfg.to_dict()
    return {k for k in set(stored) | set(new) if stored.get(k) != new.get(k)}


def _training_matches(run_dir: Path, cfg: TrainConfig) -> tuple[dict[str, Any] | None, set[str]]:
    """(stored config.json or None, training fields that differ from cfg)."""
    if not (run_dir / "config.json").is_file():
        return None, set()
    old = read_config(run_dir)
    return old, _training_diff(old.get("training") or {}, cfg)


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
    """Train (or resume / skip), evaluate and time one pair; returns its compare.json row.

    The stages run in turn (config, train, evaluate, inference), each filling its part of the row; the row's
    ``stage`` names the one running, so a failure is recorded with the stage it happened in. Never raises for
    the pair's own failures.
    """
    arm = _Arm(cc, cc.run_name(entry, clahe), data_dir, split_csv, runs_dir, log)
    row = _new_row(cc, entry, clahe, arm.name)
    t0 = time.monotonic()
    try:
        cfg = _config_stage(row, cc, entry, clahe, budget_minutes=budget_minutes, cache_dir=cache_dir, device=device)
        row["stage"] = "train"
        config = _train_stage(row, arm, cfg, progress_factory)
        row["stage"] = "evaluate"
        model = _evaluate_stage(row, arm, cfg, config, manifest_sha=manifest_sha, split_sha=split_sha)
        row["stage"] = "inference"
        _inference_stage(row, arm, config, model)
        if row.get("parameters") is None and model.run is not None:
            row["parameters"] = count_parameters(model.run.model)
        row.update(status="ok", stage=None)
    except Exception as exc:  # one failing model must not stop the comparison
        row["error"] = f"{type(exc).__name__}: {exc}"
        log(f"{arm.name} failed during {row['stage']}: {row['error']}")
    row["wall_seconds"] = round(time.monotonic() - t0, 1)
    return row


@dataclass
class _Arm:
    """One arm of a comparison as its stages see it: the config, the run's name, the data and where runs live."""

    cc: CompareConfig
    name: str
    data_dir: Path
    split_csv: Path
    runs_dir: Path
    log: Callable[[str], None]

    @property
    def run_dir(self) -> Path:
        """runs_dir/<name>: the arm's run folder."""
        return self.runs_dir / self.name

    @property
    def eval_dir(self) -> Path:
        """The run's eval folder (test.json, test_probs.csv, inference.json)."""
        return self.run_dir / "eval"


@dataclass
class _Model:
    """What the evaluate stage hands the inference stage: the device and preprocessing cache it used, and the
    model and test images when it loaded them (None while the stored evaluation was reused)."""

    dev: torch.device
    eval_cache: Path
    run: LoadedRun | None = None
    images: np.ndarray | None = None


def _new_row(cc: CompareConfig, entry: ModelEntry, clahe: bool, name: str) -> dict[str, Any]:
    """The row of arm `name` before any stage has run: its settings, status failed at stage config."""
    return {"name": name, "arch": entry.arch, "image_size": entry.image_size, "clahe": clahe,
            "weights": cc.weights_of(entry), "seed": cc.seed_of(entry),
            "kind": None, "status": "failed", "stage": "config", "error": None,
            "run_dir": str(Path("runs") / name), "trained_now": False}


def _config_stage(row: dict[str, Any], cc: CompareConfig, entry: ModelEntry, clahe: bool, *,
                  budget_minutes: float | None, cache_dir: Path | None, device: str | None) -> TrainConfig:
    """The arm's training config; fills row's image_size, kind and training. Raises for an unknown arch."""
    row["image_size"] = entry.size()
    row["kind"] = get_spec(entry.arch).kind
    cfg = train_config_for(cc, entry, clahe, budget_minutes=budget_minutes, cache_dir=cache_dir, device=device)
    row["training"] = cfg.to_dict()
    return cfg


def _train_stage(row: dict[str, Any], arm: _Arm, cfg: TrainConfig,
                 progress_factory: Callable[[str, int], Any] | None) -> dict[str, Any]:
    """Train, resume or skip the arm's run; fills row's trained_now and training record (parameters, seconds,
    epochs, best epoch, stop reason, weights hash). Returns the run's config.json; raises when it is unfinished."""
    row["trained_now"] = _train_or_resume(cfg, arm.data_dir, arm.split_csv, arm.run_dir, log=arm.log,
                                          progress_factory=progress_factory)
    config = read_config(arm.run_dir)
    if not config.get("finished"):
        raise CXRError("training did not finish", arm.run_dir)
    hist = read_history(arm.run_dir / HISTORY_FILE)
    row.update({
        "parameters": config.get("parameters"),
        "train_seconds": config.get("train_seconds"),
        "epochs_run": int(len(hist)),
        "epoch_seconds_sum": float(hist["seconds"].sum()) if "seconds" in hist else None,
        "best_epoch": config.get("best_epoch"),
        "stop_reason": config.get("stop_reason"),
        "weights_sha256": config.get("weights_sha256"),
    })
    return config


def _evaluate_stage(row: dict[str, Any], arm: _Arm, cfg: TrainConfig, config: dict[str, Any], *,
                    manifest_sha: str, split_sha: str) -> _Model:
    """The run's test evaluation, reused when current (`_eval_is_current`), else computed and written; fills
    row's metrics and files. Sets torch's threads as in training. Returns the device, cache and loaded model."""
    ev_path, probs_path = arm.eval_dir / EVAL_FILE, arm.eval_dir / PROBS_FILE
    ev = _eval_is_current(ev_path, probs_path, config, manifest_sha, split_sha, arm.cc.n_boot, arm.cc.seed)
    model = _Model(eval_cache=Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir(),
                   dev=pick_device(cfg.device))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)  # as in training, whether or not training ran in this call
    if ev is None:
        ev = _evaluate_now(arm, model, ev_path, probs_path)
    else:
        arm.log(f"{arm.name}: test evaluation is current, reused")
    row["metrics"] = _metrics(ev)
    base = arm.runs_dir.parent
    row["files"] = {"eval": str(ev_path.relative_to(base)), "probs": str(probs_path.relative_to(base)),
                    "history": str((arm.run_dir / HISTORY_FILE).relative_to(base))}
    return model


def _evaluate_now(arm: _Arm, model: _Model, ev_path: Path, probs_path: Path) -> dict[str, Any]:
    """Load the run, evaluate it on the test subset, write ev_path and probs_path; returns the eval JSON and keeps
    the loaded run and test images in `model` for the inference stage."""
    arm.log(f"{arm.name}: evaluating on the test subset")
    model.run = run = load_run(arm.run_dir, device=model.dev)
    ev, data, probs = evaluate_test(run, arm.data_dir, arm.split_csv, n_boot=arm.cc.n_boot, seed=arm.cc.seed,
                                    cache_dir=model.eval_cache)
    write_test_probs(probs_path, data.paths, data.labels, data.groups, data.sources, probs, run.classes)
    model.images = data.images
    ev_path.parent.mkdir(parents=True, exist_ok=True)
    write_json(ev_path, ev)
    return ev


def _inference_stage(row: dict[str, Any], arm: _Arm, config: dict[str, Any], model: _Model) -> None:
    """Fill row's inference: the stored timing when taken on this host, threads, device, batch, image count and
    weights, else a new one (loading the run and test images when the evaluate stage did not), written to
    inference.json."""
    inf_path = arm.eval_dir / INFERENCE_FILE
    batch, n_img = arm.cc.inference.get("batch_size", 32), arm.cc.inference.get("images", 96)
    key = {"host": platform.node(), "torch_threads": torch.get_num_threads(), "device": str(model.dev),
           "batch_size": batch, "images": n_img, "weights_sha256": config.get("weights_sha256")}
    old_inf = json.loads(inf_path.read_text()) if inf_path.is_file() else {}
    if all(old_inf.get(k) == v for k, v in key.items()):
        row["inference"] = old_inf
        return
    model.run = run = model.run or load_run(arm.run_dir, device=model.dev)
    if model.images is None:
        model.images = load_subset(arm.data_dir, arm.split_csv, "test",
                                   PreprocessedCache(run.preprocess, model.eval_cache), run.classes).images
    arm.log(f"{arm.name}: timing inference ({n_img} images, batch {batch})")
    timing = inference_timing(run, model.images, batch_size=batch, n_images=n_img)
    row["inference"] = {**key, **{k: round(v, 3) for k, v in timing.items()}, "machine": machine_info(model.dev),
                        "measured": utc_now()}
    write_json(inf_path, row["inference"])


# ------------------------------------------------------------------------------------------- locks, merging
@contextlib.contextmanager
def _arm_lock(runs_dir: Path, name: str) -> Iterator[bool]:
    """Hold runs/.locks/<name>.lock for the block; yields False (and holds nothing) when another process has it."""
    lock_dir = runs_dir / ".locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{name}.lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held = False
        else:
            held = True
            f.seek(0)
            f.truncate()
            f.write(f"{platform.node()} pid {os.getpid()} since {utc_now()}\n")
            f.flush()
        try:
            yield held
        finally:
            if held:
                fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _json_lock(out_dir: Path) -> Iterator[None]:
    """Serialise compare.json's read-merge-write (and the report written from it) between processes."""
    with open(out_dir / ".compare.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def merged_rows(path: Path, own: dict[str, dict[str, Any]], cc: CompareConfig) -> list[dict[str, Any]]:
    """The rows of every arm of cc in config order: this process's row, else the one compare.json already holds
    when it was trained with the arm's current options (another process's, or an earlier call's); arms with
    neither are left out (pending)."""
    try:
        old = {r["name"]: r for r in json.loads(path.read_text()).get("runs", []) if isinstance(r, dict)}
    except (OSError, ValueError, AttributeError, KeyError):
        old = {}
    rows = []
    for entry, clahe in cc.pairs():
        name = cc.run_name(entry, clahe)
        if name in own:
            rows.append(own[name])
        elif name in old:
            with contextlib.suppress(CXRError, TypeError, ValueError):
                stored = old[name].get("training")
                if stored and _training_diff(stored, train_config_for(cc, entry, clahe)) <= set(OPERATIONAL_FIELDS):
                    rows.append(old[name])
    return rows


def select_pairs(cc: CompareConfig, only: Sequence[str] | None) -> list[tuple[ModelEntry, bool]]:
    """cc's arms whose run name matches one of the fnmatch patterns (all arms without patterns)."""
    pairs = cc.pairs()
    if not only:
        return pairs
    chosen = [(e, c) for e, c in pairs if any(fnmatch.fnmatchcase(cc.run_name(e, c), p) for p in only)]
    if not chosen:
        raise CXRError(f"--only {' '.join(only)} matches no arm; the arms are {', '.join(cc.run_names())}",
                       cc.path)
    return chosen


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
    only: Sequence[str] | None = None,
    command: str | None = None,
    log: Callable[[str], None] = print,
    progress_factory: Callable[[str, int], Any] | None = None,
) -> dict[str, Any]:
    """Run the comparison and write the report into out_dir; returns compare.json's content.

    budget_minutes: minutes per pair, overriding the config's (<= 0: no budget). cache_dir / device
    override the recipe's. gpu_recipe: apply the config's `gpu_recipe` section. only: fnmatch patterns of the
    run names to work on (default: every arm). command: the command line recorded in the report (default: the
    equivalent `cxrscreen compare` call). ``complete`` is true once every arm of the config has a row, whichever
    process wrote it.
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
    pairs = select_pairs(cc, only)
    path, own = out_dir / "compare.json", {}
    for i, (entry, clahe) in enumerate(pairs, 1):
        name = cc.run_name(entry, clahe)
        log(f"[{i}/{len(pairs)}] {name}")
        with _arm_lock(runs_dir, name) as mine:
            if not mine:
                log(f"{name}: another compare process holds it (runs/.locks/{name}.lock), skipped")
                continue
            own[name] = compare_one(cc, entry, clahe, data_dir, split_csv, runs_dir, manifest_sha=manifest_sha,
                                    split_sha=split_sha, budget_minutes=budget_minutes, cache_dir=cache_dir,
                                    device=device, log=log, progress_factory=progress_factory)
        with _json_lock(out_dir):
            result["runs"] = merged_rows(path, own, cc)
            write_json(path, result)
    with _json_lock(out_dir):
        result["runs"] = merged_rows(path, own, cc)
        study_analyses(result, cc, out_dir)
        result["meta"]["finished"] = utc_now()
        result["table"], result["files"] = write_report(result, out_dir)
        result["complete"] = not result["pending"]
        write_json(path, result)
    rows = result["runs"]
    log(f"wrote {out_dir / 'report.html'} ({sum(r['status'] == 'ok' for r in rows)} of {len(cc.pairs())} arms ok"
        + (f"; not run yet: {', '.join(result['pending'])}" if result["pending"] else "") + ")")
    return result

