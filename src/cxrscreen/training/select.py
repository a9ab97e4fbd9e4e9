"""`cxrscreen select`: choose a feature-head recipe by what generalises.

For every candidate recipe of one YAML file it reports, with patient-grouped 95 % CIs:
- the cxr and siim grouped tests (head fitted on the train subsets of the candidate's `train_on` parts),
- the external selection set (never fitted on: no head, threshold or temperature comes from it),
- leave-one-source-out: each visible source held out in turn, the head refitted on the other sources' train
  images with the same recipe and the C the full fit chose, tested on **all** images of the held-out source:
  the AUC where the source holds two classes (COVID vs rest where it holds COVID, else pneumonia vs normal) and
  the recall of each class it holds,
and names the best candidate by `score` = mean of the external COVID AUC and the worst held-out source's
headline figure (its AUC, or the recall of its one class).
The YAML:

    data: {cxr: ../shared/data/cxr, siim: ../shared/data/siim, external: ../shared/data/external}
    splits: {cxr: configs/splits/cxr_grouped_seed0.csv, siim: configs/splits/siim_grouped_seed0.csv}
    n_boot: 500
    candidates:
      - name: lite0_b2-6_224
        train_on: [cxr, siim]
        head: {arch: lite0_features, image_size: 224, stages: [blocks.2, ...]}
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from cxrscreen import CLASSES
from cxrscreen.data.subsets import SubsetData, load_subset
from cxrscreen.errors import CXRError
from cxrscreen.evaluation.calibration import softmax
from cxrscreen.evaluation.metrics import classification_report, grouped_bootstrap_ci, safe_auc
from cxrscreen.runs.provenance import package_versions
from cxrscreen.training.feature_cache import FeatureCache, cache_summary
from cxrscreen.training.head import FittedHead, HeadRecipe, fit_logistic
from cxrscreen.transforms.cache import PreprocessedCache, default_cache_dir

PARTS = ("cxr", "siim")


@dataclass
class Candidate:
    """One recipe to compare: its name, the parts it trains on, the head recipe."""

    name: str
    train_on: list[str]
    head: HeadRecipe


@dataclass
class SelectConfig:
    data: dict[str, Path]
    splits: dict[str, Path]
    candidates: list[Candidate]
    n_boot: int = 500

    @classmethod
    def from_yaml(cls, path: Path) -> SelectConfig:
        """Read and check the YAML (see the module docstring); CXRError naming the file otherwise."""
        try:
            d = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise CXRError(f"cannot read the selection config ({exc})", path) from exc
        try:
            data = {k: Path(v) for k, v in d["data"].items()}
            splits = {k: Path(v) for k, v in d["splits"].items()}
            raw = d["candidates"]
        except (KeyError, TypeError, AttributeError) as exc:
            raise CXRError(f"the selection config needs data, splits and candidates ({exc})", path) from exc
        for part in PARTS:
            if part not in data or part not in splits:
                raise CXRError(f"the selection config names no data or split for {part!r}", path)
        if "external" not in data:
            raise CXRError("the selection config names no external selection set (data: external)", path)
        cands = []
        for c in raw or []:
            if not isinstance(c, dict) or "name" not in c:
                raise CXRError(f"every candidate needs a name; got {c!r}", path)
            train_on = list(c.get("train_on", list(PARTS)))
            if not train_on or set(train_on) - set(PARTS):
                raise CXRError(f"candidate {c['name']}: train_on must name parts of {PARTS}, not {train_on}", path)
            cands.append(Candidate(str(c["name"]), train_on, HeadRecipe.from_dict(dict(c.get("head") or {}), path)))
        if not cands:
            raise CXRError("the selection config lists no candidates", path)
        names = [c.name for c in cands]
        if len(set(names)) != len(names):
            raise CXRError(f"candidate names repeat: {names}", path)
        return cls(data=data, splits=splits, candidates=cands, n_boot=int(d.get("n_boot", 500)))


def _cat(parts: Sequence[SubsetData]) -> SubsetData:
    return SubsetData(
        images=np.concatenate([p.images for p in parts]) if parts else np.zeros((0, 1, 1), np.uint8),
        labels=np.concatenate([p.labels for p in parts]).astype(np.int64),
        groups=[g for p in parts for g in p.groups], sources=[s for p in parts for s in p.sources],
        paths=[s for p in parts for s in p.paths], errors={k: v for p in parts for k, v in p.errors.items()})


def _ci(stat: Callable[[np.ndarray], float | None], groups: Sequence[str], n_boot: int) -> dict[str, Any]:
    v = stat(np.arange(len(groups)))
    ci = grouped_bootstrap_ci(stat, groups, n_boot=n_boot, seed=0) if v is not None else None
    return {"value": v, "ci95": None if ci is None else [ci[0], ci[1]]}


def held_out_figures(labels: np.ndarray, probs: np.ndarray, groups: Sequence[str], n_boot: int) -> dict[str, Any]:
    """Figures of one held-out source: `auc` (COVID vs rest where it holds COVID and another class, else
    pneumonia vs normal where it holds both), per-class `recall` (arg-max) with grouped CIs, and `headline`:
    the AUC where there is one, else the lowest recall (a source of one class)."""
    covid, normal, pneu = (CLASSES.index(c) for c in ("covid", "normal", "pneumonia"))
    present = set(np.unique(labels).tolist())
    pred = probs.argmax(1)
    auc_kind, auc = None, None
    if covid in present and len(present) > 1:
        auc_kind = "covid_vs_rest"
        auc = _ci(lambda i: safe_auc(labels[i] == covid, probs[i, covid]), groups, n_boot)
    elif {normal, pneu} <= present:
        auc_kind = "pneumonia_vs_normal"
        m = np.isin(labels, [normal, pneu])
        g = list(np.asarray(groups)[m])
        lab, pr = labels[m], probs[m]
        auc = _ci(lambda i: safe_auc(lab[i] == pneu, pr[i, pneu] / (pr[i, pneu] + pr[i, normal])), g, n_boot)
    recall = {}
    for k in sorted(present):
        recall[CLASSES[k]] = _ci(lambda i, k=k: float((pred[i][labels[i] == k] == k).mean())
                                 if (labels[i] == k).any() else None, groups, n_boot)
    headline = auc["value"] if auc is not None else min(r["value"] for r in recall.values())
    return {"n": int(len(labels)), "auc_kind": auc_kind, "auc": auc, "recall": recall, "headline": headline,
            "headline_kind": auc_kind or "lowest recall"}


def _report(data: SubsetData, probs: np.ndarray, n_boot: int) -> dict[str, Any]:
    rep = classification_report(data.labels, probs, data.groups, list(CLASSES), n_boot=n_boot)
    src = np.asarray(data.sources)
    rep["per_source"] = {s: classification_report(data.labels[src == s], probs[src == s],
                                                  list(np.asarray(data.groups)[src == s]), list(CLASSES),
                                                  n_boot=n_boot)
                         for s in sorted(set(data.sources))} if len(set(data.sources)) > 1 else {}
    return rep


def _fit(x: np.ndarray, data: SubsetData, mask: np.ndarray, recipe: HeadRecipe, cs: Sequence[float]) -> FittedHead:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fit_logistic(x[mask], data.labels[mask], list(np.asarray(data.groups)[mask]), n_classes=len(CLASSES),
                            cs=cs, folds=recipe.cv_folds, seed=recipe.seed)


@dataclass
class _Loaded:
    """A candidate's images and chosen-stage features: every split subset of each part, and the external set."""

    subsets: dict[tuple[str, str], SubsetData]
    feats: dict[tuple[str, str], np.ndarray]
    external: SubsetData
    x_ext: np.ndarray
    cache: FeatureCache
    seconds: float

    def train(self, cand: Candidate) -> tuple[SubsetData, np.ndarray, np.ndarray]:
        """(train images of every part, their features, mask of those in the candidate's `train_on` parts)."""
        train = _cat([self.subsets[(p, "train")] for p in PARTS])
        x = np.concatenate([self.feats[(p, "train")] for p in PARTS])
        in_parts = np.isin(np.asarray([p for p in PARTS for _ in self.subsets[(p, "train")].labels]), cand.train_on)
        return train, x, in_parts


def _load(cand: Candidate, cfg: SelectConfig, log: Callable[[str], None]) -> _Loaded:
    import torch

    r = cand.head
    torch.set_num_threads(r.threads)
    t0 = time.monotonic()
    pre = PreprocessedCache(r.preprocess, default_cache_dir())
    classes = list(CLASSES)
    subsets = {(part, s): load_subset(cfg.data[part], cfg.splits[part], s, pre, classes)
               for part in PARTS for s in ("train", "val", "test")}
    external = load_subset(cfg.data["external"], None, None, pre, classes)
    cache = FeatureCache(r.arch, r.preprocess, flip=r.flip)
    feats = {k: cache.select_stages(cache.features(v.images), r.stages) for k, v in subsets.items()}
    x_ext = cache.select_stages(cache.features(external.images), r.stages)
    t_feat = time.monotonic() - t0
    log(f"{cand.name}: features ready in {t_feat:.0f} s (cache hits {cache.hits}, computed {cache.misses})")
    return _Loaded(subsets, feats, external, x_ext, cache, t_feat)


def evaluate_candidate(cand: Candidate, cfg: SelectConfig, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every figure of one candidate (see the module docstring)."""
    r = cand.head
    t0 = time.monotonic()
    ld = _load(cand, cfg, log)
    subsets, feats, external, x_ext, cache, t_feat = ld.subsets, ld.feats, ld.external, ld.x_ext, ld.cache, ld.seconds
    train, x_train, in_parts = ld.train(cand)
    t1 = time.monotonic()
    head = _fit(x_train, train, in_parts, r, r.cs)
    fit_seconds = time.monotonic() - t1
    log(f"{cand.name}: C = {head.c} ({fit_seconds:.0f} s)")

    def probs(h: FittedHead, x: np.ndarray) -> np.ndarray:
        return softmax(h.logits(x))

    out: dict[str, Any] = {"name": cand.name, "train_on": cand.train_on, "recipe": r.to_dict(),
                           "chosen_C": head.c, "cv": head.cv, "train_images": int(in_parts.sum())}
    for part in PARTS:
        test = subsets[(part, "test")]
        out[f"{part}_test"] = _report(test, probs(head, feats[(part, "test")]), cfg.n_boot)
    out["external"] = _report(external, probs(head, x_ext), cfg.n_boot)

    # leave-one-source-out: all images of the held-out source, the head refitted without it (same C)
    everything = _cat([subsets[k] for k in subsets])
    x_all = np.concatenate([feats[k] for k in subsets])
    train_src = np.asarray(train.sources)
    loso: dict[str, Any] = {}
    for src in sorted(set(everything.sources)):
        keep = in_parts & (train_src != src)
        held = _fit(x_train, train, keep, r, [head.c]) if keep.sum() < in_parts.sum() else head
        m = np.asarray(everything.sources) == src
        fig = held_out_figures(everything.labels[m], probs(held, x_all[m]), list(np.asarray(everything.groups)[m]),
                               cfg.n_boot)
        fig["refitted"] = held is not head
        fig["train_images"] = int(keep.sum())
        loso[src] = fig
    out["loso"] = loso
    worst = min(loso, key=lambda s: loso[s]["headline"])
    ext_auc = out["external"]["covid_vs_rest"]["auc"]["value"]
    out["worst_held_out"] = {"source": worst, "figure": loso[worst]["headline"], "kind": loso[worst]["headline_kind"]}
    out["score"] = (ext_auc + loso[worst]["headline"]) / 2
    out["feature_cache"] = cache_summary(cache)
    out["seconds"] = {"features": round(t_feat, 1), "fit": round(fit_seconds, 1),
                      "total": round(time.monotonic() - t0, 1)}
    return out


def evaluate_ensemble(cand: Candidate, cfg: SelectConfig, finetuned: Path, c: float, *,
                      log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Rows for a fine-tuned run directory alone and for the mean of its probabilities and the candidate's head's.

    The head is fitted as `evaluate_candidate` fits it, with the penalty `c` it chose (no CV); the fine-tuned run's
    probabilities are its softmax without its temperature (the head's are uncalibrated too), on its own
    preprocessing of the same images. Only the cxr and siim grouped tests and the external set are reported:
    leave-one-source-out would need the fine-tuned model retrained without each source, so `loso` is empty and
    `score` is None. CXRError when the run's classes differ or its images do not line up with the candidate's.
    """
    from cxrscreen.evaluation.evaluate import run_probabilities
    from cxrscreen.predict.predictor import load_model

    t0 = time.monotonic()
    ld = _load(cand, cfg, log)
    train, x_train, in_parts = ld.train(cand)
    head = _fit(x_train, train, in_parts, cand.head, [c])
    run = load_model(finetuned)
    if list(run.classes) != list(CLASSES):
        raise CXRError(f"the fine-tuned run's classes {run.classes} are not {list(CLASSES)}", finetuned)
    pre = PreprocessedCache(run.preprocess, default_cache_dir())
    where = {"cxr_test": (cfg.data["cxr"], cfg.splits["cxr"], "test", ld.subsets[("cxr", "test")],
                          ld.feats[("cxr", "test")]),
             "siim_test": (cfg.data["siim"], cfg.splits["siim"], "test", ld.subsets[("siim", "test")],
                           ld.feats[("siim", "test")]),
             "external": (cfg.data["external"], None, None, ld.external, ld.x_ext)}
    name = Path(finetuned).name or str(finetuned)
    note = ("no leave-one-source-out: it needs the fine-tuned model retrained without each held-out source; "
            "probabilities without temperature")
    alone: dict[str, Any] = {"name": f"finetuned:{name}", "train_on": list(cand.train_on),
                             "recipe": f"fine-tuned run {finetuned} ({run.arch}, {run.preprocess.image_size} px)",
                             "chosen_C": None, "train_images": (run.config.get("data") or {}).get("train_images"),
                             "loso": {}, "worst_held_out": None, "score": None, "note": note}
    both: dict[str, Any] = {**alone, "name": f"mean:{cand.name}+{name}", "chosen_C": head.c,
                            "train_images": int(in_parts.sum()),
                            "recipe": f"mean of {cand.name} ({cand.head.to_dict()}) and {alone['recipe']}"}
    for key, (data_dir, split, subset, data, x) in where.items():
        other = load_subset(data_dir, split, subset, pre, list(CLASSES))
        if other.paths != data.paths:
            raise CXRError(f"the fine-tuned run's preprocessing kept other images of {key} than the head's "
                           f"({len(other.paths)} vs {len(data.paths)})", data_dir)
        p_ft = run_probabilities(run, other.images, calibrated=False)
        alone[key] = _report(data, p_ft, cfg.n_boot)
        both[key] = _report(data, (p_ft + softmax(head.logits(x))) / 2, cfg.n_boot)
        log(f"{key}: fine-tuned COVID AUC {alone[key]['covid_vs_rest']['auc']['value']:.3f}, "
            f"mean {both[key]['covid_vs_rest']['auc']['value']:.3f}")
    seconds = {"total": round(time.monotonic() - t0, 1)}
    return [{**alone, "seconds": seconds}, {**both, "seconds": seconds}]


def merge_results(results: Sequence[dict[str, Any]], names: Sequence[str] = ()) -> dict[str, Any]:
    """One selection result holding the candidates of several `select.json` files (`names`: where they came from).

    CXRError when a candidate name repeats or when the files differ in protocol (data, splits, resamples): their
    figures would not compare. The best is named among the candidates with a score.
    """
    if not results:
        raise CXRError("no selection results to merge")
    cands = [c for r in results for c in r["candidates"]]
    seen: set[str] = set()
    for c in cands:
        if c["name"] in seen:
            raise CXRError(f"candidate {c['name']!r} appears in more than one result")
        seen.add(c["name"])
    for key in ("data", "splits", "n_boot"):
        values = [r.get(key) for r in results]
        if any(v != values[0] for v in values):
            raise CXRError(f"the results were measured with different {key}: {values}")
    r0 = results[0]
    scored = [c for c in cands if c.get("score") is not None]
    return {"best": max(scored, key=lambda c: c["score"])["name"] if scored else None,
            "chosen_by": r0["chosen_by"], "candidates": cands, "n_boot": r0["n_boot"], "data": r0["data"],
            "splits": r0["splits"], "merged_from": list(names), "versions": package_versions()}


def run_select(cfg: SelectConfig, *, only: Sequence[str] | None = None, log: Callable[[str], None] = print,
               on_result: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Evaluate every candidate (or those named in `only`) and name the best by `score`. `on_result` receives
    the result so far after each candidate (the CLI writes it, so a long run keeps what it finished)."""
    results: list[dict[str, Any]] = []
    for cand in cfg.candidates:
        if only and cand.name not in only:
            continue
        results.append(evaluate_candidate(cand, cfg, log=log))
        if on_result is not None:
            on_result(summarise(cfg, results))
    if not results:
        raise CXRError(f"no candidate is named {', '.join(only or [])}")
    return summarise(cfg, results)


def summarise(cfg: SelectConfig, results: list[dict[str, Any]]) -> dict[str, Any]:
    """The selection result of evaluated candidates: the best by score (None when none has one), the protocol."""
    scored = [c for c in results if c.get("score") is not None]
    return {"best": max(scored, key=lambda c: c["score"])["name"] if scored else None,
            "chosen_by": "mean of the external set's COVID-vs-rest AUC and the worst held-out source's figure "
                         "(its AUC, or the recall of its one class); never fitted on the external set",
            "candidates": results, "n_boot": cfg.n_boot,
            "data": {k: str(v) for k, v in cfg.data.items()}, "splits": {k: str(v) for k, v in cfg.splits.items()},
            "versions": package_versions()}


def _f(v: dict[str, Any] | float | None, digits: int = 3) -> str:
    if isinstance(v, dict):
        if v.get("value") is None:
            return "n/a"
        ci = v.get("ci95")
        return f"{v['value']:.{digits}f}" + (f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else "")
    return "n/a" if v is None else f"{v:.{digits}f}"


def _worst(c: dict[str, Any]) -> str:
    w = c.get("worst_held_out")
    return f"{w['source']} {w['figure']:.3f} ({w['kind']})" if w else "n/a"


def select_markdown(result: dict[str, Any]) -> str:
    """The selection tables: internal tests, external set, leave-one-source-out, scores."""
    cands = result["candidates"]
    lines = ["# Feature-head selection (`cxrscreen select`)", "",
             f"Best: **{result['best'] or 'n/a (no candidate with a score)'}**, chosen by {result['chosen_by']}. "
             "Grouped 95 % CIs, "
             f"{result['n_boot']} resamples. Arg-max decisions.", "",
             "## Internal grouped tests and the external selection set", "",
             "| candidate | train images | C | cxr acc | cxr macro-F1 | cxr COVID sens | cxr COVID spec "
             "| cxr COVID AUC | siim COVID AUC | external COVID found | external others not COVID "
             "| external COVID AUC | worst held-out source | score |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cands:
        cx, si, ex = c["cxr_test"], c["siim_test"], c["external"]
        lines.append(f"| {c['name']} | {c.get('train_images') or 'n/a'} | {c.get('chosen_C') or 'n/a'} | "
                     f"{_f(cx['accuracy'])} | "
                     f"{_f(cx['macro_f1'])} | {_f(cx['covid_vs_rest']['sensitivity'])} | "
                     f"{_f(cx['covid_vs_rest']['specificity'])} | {_f(cx['covid_vs_rest']['auc'])} | "
                     f"{_f(si['covid_vs_rest']['auc'])} | {_f(ex['covid_vs_rest']['sensitivity'])} | "
                     f"{_f(ex['covid_vs_rest']['specificity'])} | {_f(ex['covid_vs_rest']['auc'])} | "
                     f"{_worst(c)} | {_f(c.get('score'))} |")
    sources = sorted({s for c in cands for s in c["loso"]})
    lines += ["", "## Leave-one-source-out (held-out source: all its images; head refitted without it)", "",
              "| candidate | " + " | ".join(sources) + " | worst |", "|---|" + "---|" * (len(sources) + 1)]
    for c in cands:
        cells = []
        for s in sources:
            e = c["loso"].get(s)
            if e is None:
                cells.append("n/a")
                continue
            rec = ", ".join(f"{k} {_f(v, 2)}" for k, v in e["recall"].items())
            auc = f"{e['auc_kind']} AUC {_f(e['auc'])}; " if e["auc"] else ""
            cells.append(f"{auc}recall {rec}")
        lines.append(f"| {c['name']} | " + " | ".join(cells) + f" | {_worst(c)} |")
    lines += ["", "## Recipes", ""]
    for c in cands:
        note = f"; {c['note']}" if c.get("note") else ""
        lines.append(f"- {c['name']}: train on {', '.join(c['train_on'])}; `{c['recipe']}`; "
                     f"seconds {c.get('seconds')}{note}")
    return "\n".join(lines) + "\n"
