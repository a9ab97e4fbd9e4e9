"""The comparison report: plots (see `plots.py`), table.csv, report.md and a self-contained report.html.

`write_report(result, out_dir)` takes compare.json's content (see `compare.py`) and writes
curves_all.png, curves/<run>.png, roc_covid.png, confusion/<run>.png, table.csv, report.md and
report.html (every image embedded as a base64 data URI; no external links or resources).
"""

from __future__ import annotations

import base64
import csv
import html
import json
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxrscreen.errors import CXRError
from cxrscreen.evaluation.evaluate import evaluate_subset
from cxrscreen.evaluation.formatting import format_ci, format_value
from cxrscreen.experiments.config import STUDY_REFERENCE, CompareConfig
from cxrscreen.experiments.effects import best_vs, clahe_effect, seed_effect, transfer_effect
from cxrscreen.experiments.plots import plot_confusion, plot_curves_all, plot_roc, plot_run_curves, run_styles
from cxrscreen.experiments.probs import read_test_probs, write_test_probs
from cxrscreen.io.csvcell import safe_cell
from cxrscreen.io.files import write_json
from cxrscreen.runs.provenance import utc_now
from cxrscreen.runs.run_dir import load_run, read_history

TABLE_COLUMNS = [
    "run", "source", "status", "arch", "image_size", "clahe", "n_test", "accuracy", "macro_f1",
    "covid_sensitivity", "covid_sensitivity_ci_low", "covid_sensitivity_ci_high",
    "covid_specificity", "covid_specificity_ci_low", "covid_specificity_ci_high",
    "covid_auc", "covid_auc_ci_low", "covid_auc_ci_high",
    "parameters", "train_seconds", "epochs_run", "stop_reason", "inference_images_per_s", "note",
]
RERUN = "rerun here"
MISSING_NOTE = "n/a"


# ------------------------------------------------------------------------------------------------ table
def table_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat row per run (values copied unchanged from the eval JSON) plus the study's reference row."""
    rows = []
    for r in result["runs"]:
        m = r.get("metrics") or {}
        row: dict[str, Any] = {k: None for k in TABLE_COLUMNS}
        row.update({
            "run": r["name"], "source": RERUN, "status": r["status"] if r["status"] == "ok"
            else f"failed ({r.get('stage')})", "arch": r["arch"], "image_size": r["image_size"],
            "clahe": "on" if r["clahe"] else "off", "n_test": m.get("n_test"), "accuracy": m.get("accuracy"),
            "macro_f1": m.get("macro_f1"), "parameters": r.get("parameters"),
            # the epochs' wall time summed from the run's history: every sitting of a resumed run counts
            "train_seconds": r.get("epoch_seconds_sum") or r.get("train_seconds"),
            "epochs_run": r.get("epochs_run"), "stop_reason": r.get("stop_reason"),
            "inference_images_per_s": (r.get("inference") or {}).get("images_per_s"), "note": r.get("error"),
        })
        for key in ("covid_sensitivity", "covid_specificity", "covid_auc"):
            d = m.get(key) or {}
            ci = d.get("ci95") or [None, None]
            row[key], row[f"{key}_ci_low"], row[f"{key}_ci_high"] = d.get("value"), ci[0], ci[1]
        rows.append(row)
    ref = result["reference"]
    row = {k: None for k in TABLE_COLUMNS}
    row.update({"run": ref["name"], "source": ref["source"], "status": "reported", "arch": ref["arch"],
                "image_size": ref["image_size"], "clahe": None, "accuracy": ref["accuracy"],
                "macro_f1": ref["macro_f1"], "covid_sensitivity": ref["covid_sensitivity"],
                "covid_specificity": ref["covid_specificity"], "covid_auc": ref["covid_auc"],
                "n_test": sum(ref["test_counts"].values()), "note": ref["note"]})
    rows.append(row)
    return rows


def write_table_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    """table.csv: floats at full precision (repr), None as an empty cell."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(TABLE_COLUMNS)
        for r in rows:
            w.writerow(["" if r[c] is None else repr(r[c]) if isinstance(r[c], float) else safe_cell(r[c])
                        for c in TABLE_COLUMNS])
    return path


# ------------------------------------------------------------------------------------------- formatting
def _num(v: Any, digits: int = 3) -> str:
    """Floats to ``digits`` decimals, other values as they are, "" when missing (None, NaN)."""
    return format_value(v, digits, missing="") if v is None or isinstance(v, float) else str(v)


def _ci(row: dict[str, Any], key: str) -> str:
    return format_ci(row[key], (row[f"{key}_ci_low"], row[f"{key}_ci_high"]), missing="")


def _params(v: Any) -> str:
    return "" if v is None else f"{v / 1e6:.1f} M"


DISPLAY = [
    ("run", "run"), ("arch", "arch"), ("size", "px"), ("clahe", "CLAHE"), ("status", "status"), ("n", "n test"),
    ("acc", "accuracy"), ("f1", "macro-F1"), ("sens", "COVID sensitivity [95% CI]"),
    ("spec", "COVID specificity [95% CI]"), ("auc", "COVID AUC [95% CI]"), ("params", "parameters"),
    ("secs", "training s (epochs, all sittings)"), ("epochs", "epochs"), ("stop", "stop reason"),
    ("ips", "inference img/s"),
]


def display_rows(table: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The table as formatted strings (3 decimals, CIs in brackets)."""
    out = []
    for r in table:
        out.append({
            "run": r["run"] + (" *" if r["source"] != RERUN else ""), "arch": r["arch"],
            "size": _num(r["image_size"]), "clahe": r["clahe"] or "", "status": r["status"], "n": _num(r["n_test"]),
            "acc": _num(r["accuracy"]), "f1": _num(r["macro_f1"]), "sens": _ci(r, "covid_sensitivity"),
            "spec": _ci(r, "covid_specificity"), "auc": _ci(r, "covid_auc"), "params": _params(r["parameters"]),
            "secs": _num(r["train_seconds"], 0), "epochs": _num(r["epochs_run"]), "stop": r["stop_reason"] or "",
            "ips": _num(r["inference_images_per_s"], 1),
        })
    return out


def _signed_ci(v: float | None, ci: list[float] | None) -> str:
    return format_ci(v, ci, missing="", signed=True)


CLAHE_DISPLAY = [
    ("arch", "arch"), ("size", "px"), ("f1_on", "macro-F1 on"), ("f1_off", "macro-F1 off"),
    ("f1_diff", "macro-F1 on - off [95% CI]"), ("auc_on", "COVID AUC on"), ("auc_off", "COVID AUC off"),
    ("auc_diff", "AUC on - off [95% CI]"), ("note", "note"),
]


def arm_label(e: dict[str, Any]) -> str:
    """An architecture with its starting weights and seed where they are not the default."""
    tags = [t for t in ("ImageNet" if e.get("weights") == "imagenet" else "",
                        f"seed {e['seed']}" if e.get("seed") not in (None, 0) else "") if t]
    return e["arch"] + (f" ({', '.join(tags)})" if tags else "")


def _failed_arm(e: dict[str, Any], not_learned: Collection[str]) -> str | None:
    """The run of a CLAHE pair that did not learn (its difference then measures a failed run, not CLAHE)."""
    return next((e[k] for k in ("on", "off") if e.get(k) in not_learned), None)


def clahe_display(effect: list[dict[str, Any]], not_learned: Collection[str] = ()) -> list[dict[str, str]]:
    """The CLAHE on vs off mini-table as strings; a pair with an arm that did not learn says so in its note."""
    def note(e: dict[str, Any]) -> str:
        bad = _failed_arm(e, not_learned)
        return "; ".join(n for n in (e.get("note", ""), f"{bad} did not learn" if bad else "") if n)

    return [{
        "arch": arm_label(e), "size": _num(e["image_size"]), "f1_on": _num(e.get("macro_f1_on")),
        "f1_off": _num(e.get("macro_f1_off")), "f1_diff": _signed_ci(e.get("macro_f1_diff"), e.get("macro_f1_ci95")),
        "auc_on": _num(e.get("covid_auc_on")), "auc_off": _num(e.get("covid_auc_off")),
        "auc_diff": _signed_ci(e.get("covid_auc_diff"), e.get("covid_auc_ci95")), "note": note(e),
    } for e in effect]


def clahe_summary(effect: list[dict[str, Any]], not_learned: Collection[str] = ()) -> str:
    """One sentence: for how many architectures CLAHE helped, and where the interval excludes zero; pairs with
    an arm that did not learn are named and left out of the counts."""
    measured = [(e, _failed_arm(e, not_learned)) for e in effect if e.get("covid_auc_diff") is not None]
    done = [e for e, bad in measured if not bad]
    left_out = "".join(f" Left out of these counts: {arm_label(e)}, whose {bad} did not learn (one class for "
                       "every test image), so its difference is a failed run's, not CLAHE's."
                       for e, bad in measured if bad)
    if not done:
        return ("No architecture has both CLAHE settings evaluated and learned; the CLAHE claim is not tested "
                "here." + left_out)
    better = sum(e["covid_auc_diff"] > 0 for e in done)
    ci = [e for e in done if e.get("covid_auc_ci95")]
    sig_up = sum(e["covid_auc_ci95"][0] > 0 for e in ci)
    sig_down = sum(e["covid_auc_ci95"][1] < 0 for e in ci)
    f1_up = sum(e["macro_f1_diff"] > 0 for e in done)
    return (f"CLAHE on gave a higher COVID AUC for {better} of {len(done)} architectures and a higher macro-F1 "
            f"for {f1_up} of {len(done)}; the 95 % interval of the AUC difference lies above zero for {sig_up} "
            f"and below zero for {sig_down}. Each arm is one training run (one seed), so the intervals cover "
            "the test sample only, not training-to-training variation." + left_out)


FIGURE_NAMES = {"accuracy": "accuracy", "macro_f1": "macro-F1", "covid_sensitivity": "COVID sensitivity",
                "covid_specificity": "COVID specificity", "covid_auc": "COVID AUC"}
TRANSFER_DISPLAY = [("pair", "arm"), ("figure", "figure"), ("a", "ImageNet"), ("b", "from scratch"),
                    ("diff", "ImageNet - scratch [95% CI]")]


def transfer_display(effect: list[dict[str, Any]]) -> list[dict[str, str]]:
    """ImageNet vs from scratch: one row per (pair, figure), the paired interval of the difference."""
    rows = []
    for e in effect:
        pair = arm_setting(e)
        for f, label in FIGURE_NAMES.items():
            rows.append({"pair": pair, "figure": label, "a": _num(e.get(f"{f}_a")), "b": _num(e.get(f"{f}_b")),
                         "diff": _signed_ci(e.get(f"{f}_diff"), e.get(f"{f}_ci95")) or e.get("note", "")})
    return rows


SEED_DISPLAY = [("arm", "arm"), ("seeds", "seeds"), ("auc_b", "COVID AUC, first"), ("auc_a", "COVID AUC, second"),
                ("auc_diff", "AUC second - first [95% CI]"), ("f1_b", "macro-F1, first"),
                ("f1_a", "macro-F1, second"), ("f1_diff", "macro-F1 second - first [95% CI]")]


def arm_setting(e: dict[str, Any]) -> str:
    """'<arch> <size> px[, ImageNet], CLAHE on|off': an effect's arm without the field the effect varies."""
    return (f"{e['arch']} {e['image_size']} px{', ImageNet' if e.get('weights') == 'imagenet' else ''}, "
            f"CLAHE {'on' if e['clahe'] else 'off'}")


def seed_display(effect: list[dict[str, Any]]) -> list[dict[str, str]]:
    """A second training seed against the first: one row per arm with both."""
    return [{"arm": arm_setting(e), "seeds": f"{e['seed_b']}, {e['seed_a']}", "auc_b": _num(e.get("covid_auc_b")),
             "auc_a": _num(e.get("covid_auc_a")),
             "auc_diff": _signed_ci(e.get("covid_auc_diff"), e.get("covid_auc_ci95")) or e.get("note", ""),
             "f1_b": _num(e.get("macro_f1_b")), "f1_a": _num(e.get("macro_f1_a")),
             "f1_diff": _signed_ci(e.get("macro_f1_diff"), e.get("macro_f1_ci95"))} for e in effect]


def best_two(runs: list[dict[str, Any]], base_seed: int) -> list[dict[str, Any]]:
    """The two finished first-seed arms with the highest COVID AUC (the arms a second seed is for)."""
    done = [r for r in runs if r["status"] == "ok" and r.get("seed", 0) == base_seed and _auc_of(r) is not None]
    return sorted(done, key=lambda r: -_auc_of(r))[:2]


def seed_claim(result: dict[str, Any]) -> str:
    """How far a second seed moved the figures, and whether the second seeds are on today's best two arms."""
    base = int(result["meta"].get("seed", 0))
    effect = [e for e in result.get("seed_effect", []) if e.get("covid_auc_diff") is not None]
    top = best_two(result["runs"], base)
    top_s = ", ".join(f"{r['name']} ({_auc_of(r):.3f})" for r in top)
    if not effect:
        return (f"**How much does a second training run move the figures?** Not measured yet: no arm has a second "
                f"seed finished. The best two first-seed arms by COVID AUC now: {top_s or 'none'}.")
    per = "; ".join(f"{arm_setting(e)}: AUC {_signed_ci(e['covid_auc_diff'], e.get('covid_auc_ci95'))}, macro-F1 "
                    f"{_signed_ci(e.get('macro_f1_diff'), e.get('macro_f1_ci95'))}" for e in effect)
    seconded = {(e["arch"], e["image_size"], e["clahe"], e["weights"]) for e in effect}
    missing = [r["name"] for r in top if (r["arch"], r["image_size"], r["clahe"], r.get("weights", "none"))
               not in seconded]
    cover = (f"both of today's best two first-seed arms ({top_s}) have one" if not missing else
             f"today's best two first-seed arms are {top_s}; {' and '.join(missing)} "
             f"{'has' if len(missing) == 1 else 'have'} no second seed")
    return (f"**How much does a second training run move the figures?** Second seed - first, paired on the same "
            f"test images: {per}. An arm-to-arm difference of that size is what retraining alone gives; {cover}.")


CONVERGENCE_DISPLAY = [
    ("run", "run"), ("epochs", "epochs"), ("best", "best epoch (val loss)"), ("stop", "stop reason"),
    ("train_last", "train loss, last"), ("train_drop", "train-loss drop over the last 5 epochs"),
    ("val_min", "val loss, min"), ("val_jitter", "val-loss jitter"), ("learned", "learned"),
]
ONE_CLASS_SHARE = 0.99  # an arm that gives one class to this share of the test images has not learned
FLAT_DROP = 0.05  # a training-loss curve is called flat when it fell less than 5 % over its last 5 epochs


def convergence(runs: list[dict[str, Any]], histories: dict[str, pd.DataFrame]) -> list[dict[str, Any]]:
    """Per run with a history: epochs, best epoch, stop reason, the last training loss and its relative drop
    over the last 5 epochs (``(L[-5] - L[-1]) / L[-5]``), the lowest val loss and the val-loss jitter: the mean
    absolute change of the val loss from one epoch to the next from the second epoch on (the first epoch's
    val loss is mostly that of the starting weights), divided by its lowest value (lower: more stable)."""
    out = []
    for r in runs:
        h = histories.get(r["name"])
        if h is None or "val_loss" not in h:
            continue
        tl, vl = h["train_loss"].dropna().to_numpy(float), h["val_loss"].dropna().to_numpy(float)
        out.append({
            "run": r["name"], "arch": r["arch"], "epochs": int(len(h)), "best_epoch": r.get("best_epoch"),
            "stop_reason": r.get("stop_reason"), "train_loss_last": float(tl[-1]) if len(tl) else None,
            "train_loss_drop_last5": float((tl[-5] - tl[-1]) / tl[-5]) if len(tl) >= 5 and tl[-5] else None,
            "val_loss_min": float(vl.min()) if len(vl) else None,
            "val_loss_jitter": float(np.abs(np.diff(vl[1:])).mean() / vl.min()) if len(vl) >= 3 and vl.min() > 0
            else None,
            "top_class_share": _top_class_share(r),
        })
    return out


def _top_class_share(r: dict[str, Any]) -> float | None:
    """The share of the test images given the most often predicted class (from the confusion matrix)."""
    cm = np.asarray((r.get("metrics") or {}).get("confusion_matrix") or [], dtype=float)
    return float(cm.sum(0).max() / cm.sum()) if cm.size and cm.sum() else None


def learned(c: dict[str, Any]) -> bool:
    """False for an arm that gives one class to (nearly) every test image: its flat val loss is not stability."""
    return c.get("top_class_share") is None or c["top_class_share"] < ONE_CLASS_SHARE


def not_learned(conv: list[dict[str, Any]]) -> set[str]:
    """The runs of a convergence table that did not learn."""
    return {c["run"] for c in conv if not learned(c)}


def convergence_display(conv: list[dict[str, Any]]) -> list[dict[str, str]]:
    def pct(v: float | None) -> str:
        return "" if v is None else f"{100 * v:+.1f} %" + (" (flat)" if abs(v) < FLAT_DROP else "")

    return [{"run": c["run"], "epochs": _num(c["epochs"]), "best": _num(c["best_epoch"]),
             "stop": c["stop_reason"] or "",
             "train_last": _num(c["train_loss_last"]), "train_drop": pct(c["train_loss_drop_last5"]),
             "val_min": _num(c["val_loss_min"]), "val_jitter": _num(c["val_loss_jitter"]),
             "learned": "yes" if learned(c) else f"no: one class for {100 * c['top_class_share']:.0f} % of the test"}
            for c in conv]


def _auc_of(r: dict[str, Any]) -> float | None:
    return ((r.get("metrics") or {}).get("covid_auc") or {}).get("value")


def claims(result: dict[str, Any], conv: list[dict[str, Any]]) -> list[str]:
    """The study's claims answered from compare.json's content `result` and the convergence table `conv`: one
    paragraph per claim ("not measured yet" where the arms are missing), then the arms not run yet."""
    runs = [r for r in result["runs"] if r["status"] == "ok"]
    pending = result.get("pending") or []
    later = f" {len(pending)} arm(s) have not run yet, so this can change." if pending else ""
    out = [
        _vgg_best_claim(result.get("vgg16_vs_best") or {}, runs, later),
        _vgg_stability_claim(conv, later),
        _clahe_claim([e for e in result.get("clahe_effect", []) if e.get("covid_auc_diff") is not None], conv, later),
        _transfer_claim([e for e in result.get("transfer_effect", []) if e.get("covid_auc_diff") is not None]),
        seed_claim(result),
    ]
    if pending:
        out.append(f"Not run yet (no figures above come from them): {', '.join(pending)}.")
    return out


def _vgg_best_claim(vgg: dict[str, Any], runs: list[dict[str, Any]], later: str) -> str:
    """Is VGG-16 the best? From the best_vs comparison `vgg` ({} without a VGG-16 arm) and the finished `runs`;
    `later` is the caveat about arms not run yet."""
    if not vgg:
        return "**Is VGG-16 the best?** Not measured yet: no VGG-16 arm has finished."
    by_name = {r["name"]: r for r in runs}
    if vgg["best"] == vgg["arch_best"]:
        r = by_name[vgg["best"]]
        return (f"**Is VGG-16 the best?** Yes among the {len(runs)} finished arms: {r['name']} has the highest "
                f"COVID AUC, {_ci_of(r, 'covid_auc')}.{later}")
    b, v = by_name[vgg["best"]], by_name[vgg["arch_best"]]
    return (f"**Is VGG-16 the best?** No: {b['name']} has the highest COVID AUC of the {len(runs)} finished arms, "
            f"{_ci_of(b, 'covid_auc')}; VGG-16's best arm, {v['name']}, has {_ci_of(v, 'covid_auc')}. Paired, on "
            f"the same test images, {b['name']} - {v['name']}: AUC "
            f"{_signed_ci(vgg.get('covid_auc_diff'), vgg.get('covid_auc_ci95'))}, macro-F1 "
            f"{_signed_ci(vgg.get('macro_f1_diff'), vgg.get('macro_f1_ci95'))}.{later}")


def _vgg_stability_claim(conv: list[dict[str, Any]], later: str) -> str:
    """Is VGG-16's validation loss the most stable? VGG-16's rank by val-loss jitter among the arms of the
    convergence table `conv` that learned; an arm that did not learn is named, not ranked."""
    jit = [c for c in conv if c["val_loss_jitter"] is not None and learned(c)]
    vj = [c for c in jit if c["arch"] == "vgg16"]
    stuck = [c["run"] for c in conv if c["arch"] == "vgg16" and not learned(c)]
    if stuck and not vj:
        best = min(jit, key=lambda c: c["val_loss_jitter"]) if jit else None
        return (f"**Is VGG-16's validation loss the most stable?** Not answerable: {', '.join(stuck)} did not "
                "learn (one class for every test image), so its flat validation loss is not stability"
                + (f"; of the arms that learned, the most stable is {best['run']} ({best['val_loss_jitter']:.3f})"
                   if best else "") + f".{later}")
    if not vj:
        return "**Is VGG-16's validation loss the most stable?** Not measured yet: no VGG-16 arm has finished."
    ranked = sorted(jit, key=lambda c: c["val_loss_jitter"])
    ranks = [f"{c['run']} ranks {ranked.index(c) + 1} of {len(ranked)} (jitter {c['val_loss_jitter']:.3f})"
             for c in vj]
    return (f"**Is VGG-16's validation loss the most stable?** {'Yes' if ranked[0]['arch'] == 'vgg16' else 'No'}"
            f": {'; '.join(ranks)}; the most stable is {ranked[0]['run']} ({ranked[0]['val_loss_jitter']:.3f})"
            + (f"; {', '.join(stuck)} did not learn and is not ranked" if stuck else "") + f".{later}")


def _clahe_claim(ce: list[dict[str, Any]], conv: list[dict[str, Any]], later: str) -> str:
    """Does CLAHE help? The summary and the paired on - off differences of the measured CLAHE pairs `ce`."""
    if not ce:
        return "**Does CLAHE help?** Not measured yet: no architecture has both CLAHE arms finished."
    per = "; ".join(f"{arm_label(e)}: AUC {_signed_ci(e['covid_auc_diff'], e.get('covid_auc_ci95'))}, macro-F1 "
                    f"{_signed_ci(e['macro_f1_diff'], e.get('macro_f1_ci95'))}" for e in ce)
    return f"**Does CLAHE help?** {clahe_summary(ce, not_learned(conv))} On - off, paired: {per}.{later}"


def _transfer_claim(te: list[dict[str, Any]]) -> str:
    """How far does ImageNet transfer move each figure? The paired differences of the measured pairs `te`."""
    if not te:
        return ("**How far does ImageNet transfer move each figure?** Not measured yet: no architecture has "
                "both an ImageNet and a from-scratch arm finished.")
    per = "; ".join(
        f"{e['arch']} CLAHE {'on' if e['clahe'] else 'off'}: " + ", ".join(
            f"{FIGURE_NAMES[f]} {_signed_ci(e.get(f'{f}_diff'), e.get(f'{f}_ci95'))}" for f in FIGURE_NAMES)
        for e in te)
    return f"**How far does ImageNet transfer move each figure?** ImageNet - from scratch, paired: {per}."


def _ci_of(r: dict[str, Any], key: str) -> str:
    d = r["metrics"][key]
    return format_ci(d.get("value"), d.get("ci95"), missing="n/a")


def _md_table(rows: list[dict[str, str]], columns: list[tuple[str, str]]) -> str:
    def cell(s: str) -> str:
        return str(s).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r[k]) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines)


def _html_table(rows: list[dict[str, str]], columns: list[tuple[str, str]], marked: set[int] | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h in columns)
    body = []
    for i, r in enumerate(rows):
        cls = ' class="ref"' if marked and i in marked else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(str(r[k]))}</td>" for k, _ in columns) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _median_share(timed: list[dict[str, Any]]) -> str:
    shares = [t["cpu_share"] for t in timed if t.get("cpu_share") is not None]
    return f"{float(np.median(shares)):.2f}" if shares else "n/a"


def _notes(result: dict[str, Any]) -> list[str]:
    meta, ref = result["meta"], result["reference"]
    budget = meta.get("budget_minutes_per_run")
    machine = meta.get("machine") or {}
    timed = [r["inference"] for r in result["runs"] if r.get("inference")]
    threads = sorted({t.get("torch_threads") for t in timed}) or [machine.get("torch_threads")]
    devices = sorted({str(t.get("device")) for t in timed}) or [machine.get("device")]
    return [
        f"Test subset of {meta['data']['split']} ({meta['data']['subset_images']['test']} images); every row "
        "above the reference is trained and evaluated here on the same split. CIs: bootstrap over patients "
        f"(split_group), {meta['n_boot']} resamples, seed {meta['seed']}. COVID is called when it is the "
        "arg-max class.",
        (f"Training budget {budget} min per run: a run stopped by the budget is not converged, so the comparison "
         "is of what each architecture reaches within that time on this machine, not of the architectures "
         "at convergence." if budget else "No training time budget."),
        f"Inference images/s: preprocessed images in memory, batch {meta['inference'].get('batch_size')}, "
        f"after one warm-up batch, {'/'.join(map(str, threads))} torch thread(s) on {machine.get('processor')} "
        f"({', '.join(map(str, devices))}); load average {machine.get('load_average_1min')} at the start. Other "
        "processes on the machine lower these figures; compare.json also gives images per CPU-second and the "
        f"share of the cores the timing got (median {_median_share(timed)}).",
        f"Row marked *, {ref['name']}: {ref['source']}. {ref['note']}. "
        f"Sensitivity {100 * ref['covid_sensitivity']:.2f} %, specificity {100 * ref['covid_specificity']:.2f} %.",
    ]


def _figure_list(files: dict[str, Any]) -> list[tuple[str, str]]:
    figs = [("Training curves of every run", files["curves_all"]), ("ROC, COVID vs rest", files["roc_covid"])]
    figs += [(f"Confusion matrix: {n}", p) for n, p in files["confusion"].items()]
    figs += [(f"Curves: {n}", p) for n, p in files["curves"].items()]
    return figs


def render_markdown(result: dict[str, Any], table: list[dict[str, Any]], files: dict[str, Any]) -> str:
    """report.md (images referenced by relative path)."""
    meta = result["meta"]
    failed = [r for r in result["runs"] if r["status"] != "ok"]
    stuck = not_learned(files.get("convergence", []))
    parts = [
        f"# {meta['title']}",
        "Research use only: not a medical device.",
        "## Results on the test subset",
        _md_table(display_rows(table), DISPLAY),
        *[f"- {n}" for n in _notes(result)],
        "## The study's claims, answered from the finished arms",
        *claims(result, files.get("convergence", [])),
        "## CLAHE on vs off",
        clahe_summary(result.get("clahe_effect", []), stuck),
        _md_table(clahe_display(result.get("clahe_effect", []), stuck), CLAHE_DISPLAY),
        "## ImageNet transfer vs from scratch",
        _md_table(transfer_display(result.get("transfer_effect", [])), TRANSFER_DISPLAY)
        if result.get("transfer_effect") else "Not measured yet.",
        "## A second seed vs the first",
        SEED_NOTE,
        _md_table(seed_display(result.get("seed_effect", [])), SEED_DISPLAY)
        if result.get("seed_effect") else "Not measured yet.",
        "## Convergence",
        CONVERGENCE_NOTE,
        _md_table(convergence_display(files.get("convergence", [])), CONVERGENCE_DISPLAY),
    ]
    if result.get("pending"):
        parts += ["## Not run yet", "These arms of the config have not finished; they are not in any table or "
                  "answer above. The same `cxrscreen compare` command resumes them.",
                  *[f"- {n}" for n in result["pending"]]]
    if failed:
        parts += ["## Failed runs", *[f"- {r['name']} ({r['stage']}): `{r['error']}`" for r in failed]]
    parts += ["## Figures", *[f"### {t}\n\n![{t}]({p})" for t, p in _figure_list(files)]]
    parts += ["## Reproducibility", *_repro_md(meta)]
    return "\n\n".join(parts) + "\n"


SEED_NOTE = (
    "The same arm trained again with another seed (initial weights of the new layers, augmentation, batch order); "
    "tested on the same images. The CLAHE and transfer effects above are between single runs, so a difference "
    "no larger than these is not evidence of an effect.")
CONVERGENCE_NOTE = (
    f"Training-loss drop: its relative fall over the last 5 epochs (flat: under {100 * FLAT_DROP:.0f} %). "
    "Val-loss jitter: the mean absolute change of the val loss between consecutive epochs from the second epoch on "
    "(the first is mostly the starting weights'), over its lowest value (lower is more stable). The weights kept "
    "are those of the best val-loss epoch. Learned: no for an arm that "
    f"gives one class to {100 * ONE_CLASS_SHARE:.0f} % or more of the test images; such an arm's flat val loss is not "
    "stability, and it is left out of the stability ranking.")


def _repro_items(meta: dict[str, Any]) -> list[tuple[str, str]]:
    d = meta["data"]
    return [
        ("command", meta["command"]), ("seed", str(meta["seed"])),
        ("manifest", f"{d['manifest']} (sha256 {d['manifest_sha256']})"),
        ("split", f"{d['split']} (sha256 {d['split_sha256']}; train/val/test "
                  f"{d['subset_images']['train']}/{d['subset_images']['val']}/{d['subset_images']['test']})"),
        ("versions", ", ".join(f"{k} {v}" for k, v in meta["versions"].items())),
        ("machine", ", ".join(f"{k} {v}" for k, v in (meta.get("machine") or {}).items())),
        ("GPU recipe applied", "yes" if meta.get("gpu_recipe_applied") else "no"),
        ("started / finished", f"{meta.get('started')} / {meta.get('finished')}"),
    ]


def _repro_md(meta: dict[str, Any]) -> list[str]:
    items = [f"- {k}: `{v}`" if k == "command" else f"- {k}: {v}" for k, v in _repro_items(meta)]
    return [*items, f"Config ({meta.get('config_path')}), verbatim:", f"```yaml\n{meta['config_text'].rstrip()}\n```"]


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


CSS = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;font-size:12px;margin:.5em 0}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:right}td:first-child,th:first-child{text-align:left}
tr.ref{background:#fff4d6;font-style:italic}pre{background:#f5f5f5;padding:.6em;overflow:auto;font-size:12px}
img{max-width:100%;border:1px solid #eee}figure{margin:1em 0}.warn{color:#8a5300}"""


def render_html(result: dict[str, Any], table: list[dict[str, Any]], files: dict[str, Any], out_dir: Path) -> str:
    """report.html from compare.json's content, the table rows and the files written (images read from out_dir):
    self-contained (inline CSS, images as base64 data URIs, no links)."""
    meta = result["meta"]
    e = html.escape
    failed = [r for r in result["runs"] if r["status"] != "ok"]
    stuck = not_learned(files.get("convergence", []))
    ref_rows = {i for i, r in enumerate(table) if r["source"] != RERUN}
    body = [
        f"<h1>{e(meta['title'])}</h1>", '<p class="warn">Research use only: not a medical device.</p>',
        "<h2>Results on the test subset</h2>", _html_table(display_rows(table), DISPLAY, ref_rows),
        "<ul>" + "".join(f"<li>{e(n)}</li>" for n in _notes(result)) + "</ul>",
        "<h2>The study's claims, answered from the finished arms</h2>",
        *[f"<p>{e(c).replace('**', '')}</p>" for c in claims(result, files.get("convergence", []))],
        "<h2>CLAHE on vs off</h2>", f"<p>{e(clahe_summary(result.get('clahe_effect', []), stuck))}</p>",
        _html_table(clahe_display(result.get("clahe_effect", []), stuck), CLAHE_DISPLAY),
        "<h2>ImageNet transfer vs from scratch</h2>",
        _html_table(transfer_display(result.get("transfer_effect", [])), TRANSFER_DISPLAY)
        if result.get("transfer_effect") else "<p>Not measured yet.</p>",
        "<h2>A second seed vs the first</h2>", f"<p>{e(SEED_NOTE)}</p>",
        _html_table(seed_display(result.get("seed_effect", [])), SEED_DISPLAY)
        if result.get("seed_effect") else "<p>Not measured yet.</p>",
        "<h2>Convergence</h2>", f"<p>{e(CONVERGENCE_NOTE)}</p>",
        _html_table(convergence_display(files.get("convergence", [])), CONVERGENCE_DISPLAY),
    ]
    if result.get("pending"):
        body += ["<h2>Not run yet</h2>", "<ul>" + "".join(f"<li>{e(n)}</li>" for n in result["pending"]) + "</ul>"]
    if failed:
        body += ["<h2>Failed runs</h2>", "<ul>" + "".join(
            f"<li>{e(r['name'])} ({e(str(r['stage']))}): <code>{e(str(r['error']))}</code></li>" for r in failed
        ) + "</ul>"]
    body += [*_html_figures(files, out_dir), *_html_repro(meta)]
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{e(meta['title'])}</title><style>{CSS}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def _html_figures(files: dict[str, Any], out_dir: Path) -> list[str]:
    """The Figures section of report.html: each figure of `files` embedded from out_dir as a data URI."""
    e = html.escape
    return ["<h2>Figures</h2>", *(f'<figure><figcaption>{e(title)}</figcaption><img alt="{e(title)}" '
                                  f'src="{_data_uri(out_dir / p)}"></figure>' for title, p in _figure_list(files))]


def _html_repro(meta: dict[str, Any]) -> list[str]:
    """The Reproducibility section of report.html from compare.json's meta: the items, then the config verbatim."""
    e = html.escape
    return ["<h2>Reproducibility</h2>", "<ul>" + "".join(
        f"<li><b>{e(k)}</b>: <code>{e(v)}</code></li>" for k, v in _repro_items(meta)) + "</ul>",
        f"<p>Config ({e(str(meta.get('config_path')))}), verbatim:</p><pre>{e(meta['config_text'])}</pre>"]


# ------------------------------------------------------------------------------------------------ driver
def write_report(result: dict[str, Any], out_dir: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Write every plot, table.csv, report.md and report.html of compare.json's content `result` into out_dir;
    returns (table rows, files relative to out_dir)."""

    out_dir = Path(out_dir)
    (out_dir / "curves").mkdir(parents=True, exist_ok=True)
    (out_dir / "confusion").mkdir(parents=True, exist_ok=True)
    runs = result["runs"]
    styles = run_styles(runs)
    histories = {r["name"]: read_history(out_dir / r["run_dir"] / "history.csv") for r in runs}
    histories = {k: h for k, h in histories.items() if len(h)}
    # "confusion" is filled below; its key is placed here to keep compare.json's key order
    files: dict[str, Any] = {"curves": _plot_curves(histories, out_dir), "confusion": {}}
    files["curves_all"] = str(plot_curves_all(histories, styles, out_dir / "curves_all.png").relative_to(out_dir))
    files["convergence"] = convergence(runs, histories)
    files["confusion"], probs, aucs = _plot_confusions(runs, out_dir)
    files["roc_covid"] = str(plot_roc(probs, aucs, styles, result["reference"], out_dir / "roc_covid.png")
                             .relative_to(out_dir))
    table = table_rows(result)
    files["table"] = str(write_table_csv(table, out_dir / "table.csv").relative_to(out_dir))
    (out_dir / "report.md").write_text(render_markdown(result, table, files))
    (out_dir / "report.html").write_text(render_html(result, table, files, out_dir))
    files.update({"report_md": "report.md", "report_html": "report.html", "compare_json": "compare.json"})
    return table, files


def _plot_curves(histories: dict[str, pd.DataFrame], out_dir: Path) -> dict[str, str]:
    """curves/<run>.png for each run's history; returns {run: path relative to out_dir}."""
    return {name: str(plot_run_curves(name, h, out_dir / "curves" / f"{name}.png").relative_to(out_dir))
            for name, h in histories.items()}


def _plot_confusions(runs: list[dict[str, Any]], out_dir: Path
                     ) -> tuple[dict[str, str], dict[str, pd.DataFrame], dict[str, float]]:
    """confusion/<run>.png for each finished run; returns ({run: path relative to out_dir}, {run: its test
    probabilities}, {run: its COVID AUC}) for the ROC plot."""
    paths, probs, aucs = {}, {}, {}
    for r in runs:
        if r["status"] == "ok":
            probs[r["name"]] = read_test_probs(out_dir / r["files"]["probs"])
            aucs[r["name"]] = r["metrics"]["covid_auc"]["value"]
            m = r["metrics"]
            paths[r["name"]] = str(plot_confusion(
                r["name"], m["confusion_matrix"], m["class_names"], out_dir / "confusion" / f"{r['name']}.png"
            ).relative_to(out_dir))
    return paths, probs, aucs


def report_run(run_dir: Path, data_dir: Path, split_csv: Path, out_dir: Path, *, subset: str = "test",
               n_boot: int = 1000, seed: int = 0, reference: dict[str, Any] | None = None) -> dict[str, Any]:
    """One trained run's figures: the eval JSON of `cxrscreen evaluate` (same function, same defaults) as
    eval_<subset>.json, its per-image probabilities (<subset>_probs.csv), curves.png (train / val loss per
    epoch), roc_covid.png (with the study's point), confusion.png, and the run's history.csv and config.json.
    Returns the eval JSON."""
    import shutil


    if reference is None:
        reference = STUDY_REFERENCE
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run = load_run(run_dir)
    ev, data, probs = evaluate_subset(run, Path(data_dir), split_csv=Path(split_csv), subset=subset, n_boot=n_boot,
                                      seed=seed)
    write_json(out_dir / f"eval_{subset}.json", ev)
    write_test_probs(out_dir / f"{subset}_probs.csv", data.paths, data.labels, data.groups, data.sources, probs,
                     run.classes)
    for name in ("history.csv", "config.json"):
        shutil.copyfile(run_dir / name, out_dir / name)
    label = run_dir.name
    plot_run_curves(label, read_history(run_dir / "history.csv"), out_dir / "curves.png")
    plot_roc({label: read_test_probs(out_dir / f"{subset}_probs.csv")}, {label: ev["covid_vs_rest"]["auc"]["value"]},
             {}, reference, out_dir / "roc_covid.png")
    plot_confusion(label, ev["confusion_matrix"], ev["class_names"], out_dir / "confusion.png")
    return ev


def main(argv: list[str] | None = None) -> int:
    """Reports without training.

    ``python -m cxrscreen.experiments.report compare OUT_DIR --config CONFIG [--gpu-recipe]``: the report of the
    runs a comparison has finished (`report_finished`). ``python -m cxrscreen.experiments.report run
    RUN_DIR --data D --split S --out OUT``: one run's test figures and plots (`report_run`).
    """
    import argparse


    ap = argparse.ArgumentParser(prog="python -m cxrscreen.experiments.report", description=main.__doc__)
    sub = ap.add_subparsers(dest="what", required=True)
    c = sub.add_parser("compare", help="the report of a comparison's finished runs")
    c.add_argument("out_dir", type=Path)
    c.add_argument("--config", type=Path, required=True)
    c.add_argument("--gpu-recipe", action="store_true")
    r = sub.add_parser("run", help="one run's test figures and plots")
    r.add_argument("run_dir", type=Path)
    r.add_argument("--data", type=Path, required=True)
    r.add_argument("--split", type=Path, required=True)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--subset", default="test")
    args = ap.parse_args(argv)
    if args.what == "run":
        ev = report_run(args.run_dir, args.data, args.split, args.out, subset=args.subset)
        c = ev["covid_vs_rest"]
        print(f"wrote {args.out}: n {ev['n']}, COVID AUC {format_ci(c['auc']['value'], c['auc'].get('ci95'))}")
        return 0
    result = report_finished(args.out_dir, args.config, gpu_recipe=args.gpu_recipe)
    ok = sum(r["status"] == "ok" for r in result["runs"])
    print(f"wrote {args.out_dir / 'report.md'}: {ok} run(s) finished, {len(result['pending'])} not run yet")
    return 0


def pending_runs(cc: CompareConfig, rows: list[dict[str, Any]]) -> list[str]:
    """Run names the config lists that have no row yet (not run, or interrupted before they finished)."""
    done = {r["name"] for r in rows}
    return [n for n in cc.run_names() if n not in done]


def study_analyses(result: dict[str, Any], cc: CompareConfig, out_dir: Path) -> None:
    """Fill result's clahe_effect, transfer_effect, vgg16_vs_best, seed_effect and pending from its runs (in
    place)."""
    rows, n_boot, seed = result["runs"], cc.n_boot, cc.seed
    result["clahe_effect"] = clahe_effect(rows, out_dir, n_boot=n_boot, seed=seed)
    result["transfer_effect"] = transfer_effect(rows, out_dir, n_boot=n_boot, seed=seed)
    result["vgg16_vs_best"] = best_vs(rows, "vgg16", out_dir, n_boot=n_boot, seed=seed)
    result["seed_effect"] = seed_effect(rows, out_dir, base_seed=cc.seed, n_boot=n_boot, seed=seed)
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

    result["table"], result["files"] = write_report(result, out_dir)
    result["complete"] = not result["pending"]
    write_json(path, result)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
