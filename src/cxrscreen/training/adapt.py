"""Site adaptation of a feature-head model: refit its head on a hospital's own labelled films, with replay.

`adapt_run(model_dir, site_dir, out_dir)` splits the site's manifest by patient group (`split_grouped`: train /
val / test), computes the frozen features of its films with the model itself, refits the standardisation and the
linear head on the site's train films **plus the model's replay set** (`replay.npz`: a class-balanced sample of
the features it was trained on, so a class the site lacks, e.g. COVID at a children's hospital, is not forgotten),
refits the temperature and the COVID operating point on the site's val films where they hold both COVID and other
films (else keeps the model's), and reports the site's test films before and after with grouped CIs. It writes a
new run directory (usable with `predict --model`) whose config.json `adaptation` block and ADAPTATION.md say which
site data it saw.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cxrscreen.errors import CXRError
from cxrscreen.training.head import REPLAY_FILE, FittedHead, fit_logistic, read_replay


def adapt_head(site_x: np.ndarray, site_y: np.ndarray, site_groups: Sequence[str], replay_x: np.ndarray,
               replay_y: np.ndarray, *, n_classes: int, cs: Sequence[float], replay_weight: float = 1.0,
               folds: int = 5, seed: int = 0) -> FittedHead:
    """A head fitted on the site's features and the replayed training features together (C by grouped CV;
    every replay row is its own group). replay_weight scales the replay rows' sample weights."""
    x = np.concatenate([site_x, replay_x])
    y = np.concatenate([site_y, replay_y])
    groups = [*map(str, site_groups), *(f"replay:{i}" for i in range(len(replay_y)))]
    sw = np.concatenate([np.ones(len(site_y)), np.full(len(replay_y), float(replay_weight))])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fit_logistic(x, y, groups, n_classes=n_classes, cs=cs, folds=folds, seed=seed, sample_weight=sw)


def model_features(run: Any, images: np.ndarray, *, batch_size: int = 32) -> np.ndarray:
    """Raw pooled features (N, D) of preprocessed uint8 images, computed by the loaded feature-head model itself."""
    import torch

    from cxrscreen.transforms.preprocess import to_model_array

    out = []
    model = run.model.eval()
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(to_model_array(images[i : i + batch_size], run.preprocess))
            out.append(model.pooled(x.contiguous(memory_format=torch.channels_last)).double().numpy())
    return np.concatenate(out) if out else np.zeros((0, sum(model.dims)))


def site_report(labels: np.ndarray, probs: np.ndarray, groups: Sequence[str], classes: Sequence[str],
                n_boot: int) -> dict[str, Any]:
    """Arg-max figures of the site's test films with grouped CIs, and the recall of every class they hold."""
    from cxrscreen.evaluation.metrics import classification_report

    rep = classification_report(labels, probs, list(groups), list(classes), n_boot=n_boot)
    rep["recall_present"] = {c: rep["classes"][c]["recall"] for k, c in enumerate(classes) if (labels == k).any()}
    return rep


def adapt_run(model_dir: Path | None, site_dir: Path, out_dir: Path, *, test_frac: float = 0.4,
              val_frac: float = 0.2, replay_weight: float = 1.0, seed: int = 0, n_boot: int = 500,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Adapt a feature-head model to a site (see the module docstring). Returns the report (also in out_dir)."""
    import torch

    from cxrscreen.data.manifest import manifest_hash, read_manifest
    from cxrscreen.data.splits import split_grouped, write_split
    from cxrscreen.data.subsets import load_subset
    from cxrscreen.evaluation.calibration import choose_threshold, fit_temperature, softmax
    from cxrscreen.io.files import write_json
    from cxrscreen.models.feature_head import FeatureHeadNet
    from cxrscreen.predict.predictor import default_model_dir, load_model
    from cxrscreen.runs.run_dir import save_weights, write_config
    from cxrscreen.transforms.cache import PreprocessedCache, default_cache_dir

    src_dir = Path(model_dir) if model_dir is not None else default_model_dir()
    run = load_model(model_dir)
    if not isinstance(run.model, FeatureHeadNet):
        raise CXRError(f"adaptation refits a feature-head model's head; {run.arch} is not one", src_dir)
    replay_x, replay_y, _ = read_replay(src_dir)
    classes = run.classes
    site_dir, out_dir = Path(site_dir), Path(out_dir)
    df = read_manifest(site_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    split_csv = Path(write_split(split_grouped(df, seed=seed, test_frac=test_frac, val_frac=val_frac),
                                 out_dir / "site_split.csv"))
    cache = PreprocessedCache(run.preprocess, default_cache_dir())
    parts = {s: load_subset(site_dir, split_csv, s, cache, classes) for s in ("train", "val", "test")}
    if len(np.unique(parts["train"].labels)) < 1 or not len(parts["test"].labels):
        raise CXRError("the site split left no films to fit on or to test on; give the site more films", site_dir)
    feats = {s: model_features(run, p.images) for s, p in parts.items()}
    cfg = run.config
    cs = (cfg.get("training") or {}).get("cs") or [0.001, 0.003, 0.01, 0.03, 0.1]
    tr = parts["train"]
    head = adapt_head(feats["train"], tr.labels, tr.groups, replay_x, replay_y, n_classes=len(classes), cs=cs,
                      replay_weight=replay_weight, seed=seed)
    # the temperature and the COVID operating point: refitted on the site's val films where they allow it
    covid = classes.index("covid")
    va = parts["val"]
    temperature, operating_point = run.temperature, cfg.get("operating_point")
    val_logits = head.logits(feats["val"])
    refit_cal = len(va.labels) > 0 and len(np.unique(va.labels)) > 1
    if refit_cal:
        temperature = fit_temperature(val_logits, va.labels)
    refit_op = refit_cal and (va.labels == covid).any() and (va.labels != covid).any()
    if refit_op:
        target = float((operating_point or {}).get("target_sensitivity", 0.95))
        op = choose_threshold(softmax(val_logits, temperature)[:, covid], va.labels == covid, target)
        operating_point = {"class": "covid", "threshold": op["threshold"], "target_sensitivity": target,
                           "chosen_on": "site val", "val_sensitivity": op["val_sensitivity"],
                           "val_specificity": op["val_specificity"]}
    te = parts["test"]
    before_probs = softmax(run.task.logits(run, te.images), run.temperature)
    after_probs = softmax(head.logits(feats["test"]), temperature)
    before = site_report(te.labels, before_probs, te.groups, classes, n_boot)
    after = site_report(te.labels, after_probs, te.groups, classes, n_boot)

    model = run.model.float()
    model.set_head(torch.from_numpy(head.mean), torch.from_numpy(head.scale), torch.from_numpy(head.weight),
                   torch.from_numpy(head.bias))
    sha = save_weights(model, out_dir)
    counts = {s: {"images": int(len(p.labels)), "per_class": {c: int((p.labels == k).sum())
                                                                for k, c in enumerate(classes)}}
              for s, p in parts.items()}
    adaptation = {
        "from_model": str(src_dir), "from_weights_sha256": cfg.get("weights_sha256"),
        "site_data": str(site_dir), "site_manifest_sha256": manifest_hash(site_dir),
        "site_sources": sorted(set(df["source"])), "site_split": split_csv.name, "site_images": counts,
        "replay_rows": int(len(replay_y)), "replay_per_class": np.bincount(replay_y, minlength=len(classes)).tolist(),
        "replay_weight": replay_weight, "chosen_C": head.c, "cv": head.cv, "seed": seed,
        "temperature_refit_on_site_val": bool(refit_cal), "operating_point_refit_on_site_val": bool(refit_op),
    }
    decision = cfg.get("decision") or {"rule": "argmax"}
    if decision.get("rule") == "threshold" and operating_point:
        decision = {**decision, "threshold": operating_point["threshold"]}
    new_cfg = {**{k: v for k, v in cfg.items() if k not in ("bundled_from", "onnx_sha256", "weights_dtype")},
               "weights_sha256": sha, "calibration": {**(cfg.get("calibration") or {}), "temperature": temperature,
                                                      "fitted_on": "site val" if refit_cal else
                                                      (cfg.get("calibration") or {}).get("fitted_on")},
               "operating_point": operating_point, "decision": decision, "adaptation": adaptation}
    write_config(out_dir, new_cfg)
    # the adapted model replays the same training features when adapted again, plus this site's train films
    shutil.copyfile(src_dir / "replay.npz", out_dir / REPLAY_FILE)
    report = {"adaptation": adaptation, "site_test_before": before, "site_test_after": after}
    (out_dir / "eval").mkdir(exist_ok=True)
    write_json(out_dir / "eval" / "adaptation.json", report)
    (out_dir / "ADAPTATION.md").write_text(adaptation_markdown(report))
    log(f"wrote {out_dir}")
    return report


def adaptation_markdown(report: dict[str, Any]) -> str:
    """The adapted model's card section: what site data it saw, and the site's test before and after."""
    from cxrscreen.evaluation.formatting import format_ci

    a = report["adaptation"]
    lines = ["# Site adaptation", "",
             f"Adapted from `{a['from_model']}` (weights sha256 `{a['from_weights_sha256']}`) on the site data "
             f"`{a['site_data']}` (manifest sha256 `{a['site_manifest_sha256']}`, sources "
             f"{', '.join(a['site_sources'])}), split by patient group into `{a['site_split']}`:", ""]
    for s, c in a["site_images"].items():
        lines.append(f"- {s}: {c['images']} films {json.dumps(c['per_class'])}")
    lines += ["", f"The head was refitted on the site's train films and {a['replay_rows']} replayed training feature "
              f"rows (per class {a['replay_per_class']}, weight {a['replay_weight']}); C = {a['chosen_C']} by grouped "
              f"CV. Temperature refitted on site val: {a['temperature_refit_on_site_val']}; operating point: "
              f"{a['operating_point_refit_on_site_val']}.", "",
              "| site test | n | accuracy | macro-F1 | COVID sensitivity | COVID specificity | COVID AUC | recall |",
              "|---|---|---|---|---|---|---|---|"]
    for name in ("before", "after"):
        r = report[f"site_test_{name}"]
        c = r["covid_vs_rest"]
        rec = ", ".join(f"{k} {v:.3f}" for k, v in r["recall_present"].items())
        lines.append(f"| {name} | {r['n']} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} | {format_ci(c['sensitivity'])} "
                     f"| {format_ci(c['specificity'])} | {format_ci(c['auc'])} | {rec} |")
    return "\n".join(lines) + "\n"
