"""The audit's markdown report: the verdicts of every part in words, with their figures."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from cxrscreen.audit.masking import BOX_SUBSETS, CONDITIONS
from cxrscreen.evaluation.formatting import format_value

# ------------------------------------------------------------------------------------------------ report
_f = format_value  # a figure (or {"value": ...}) to 3 decimals, "n/a" when missing


def _loso_note(e: dict[str, Any]) -> str:
    """The note column of a LOSO entry `e`: single-class source, sole source of a class, classes it leaves
    without training images; "-" when none applies."""
    notes = []
    if e["single_class_source"]:
        notes.append(f"all {e['classes'][0]}: a test of that class from an unseen hospital")
    if e["sole_source_of"]:
        notes.append(f"only source of {', '.join(e['sole_source_of'])}")
    if e["classes_without_training_images"]:
        notes.append(f"no training images of {', '.join(e['classes_without_training_images'])}")
    return "; ".join(notes) or "-"


def write_markdown(result: dict[str, Any], path: Path) -> Path:
    """Write audit.md from the audit's JSON (`result`) to `path` and return the path.

    The header and findings, then one section per part the result holds (in `SECTIONS` order), then the
    reproducibility block; each section is a function of the result that returns its lines.
    """
    lines = _header(result["meta"]) + _findings(result["findings"])
    for section in SECTIONS:
        lines += section(result)
    lines += _reproducibility(result["meta"])
    Path(path).write_text("\n".join(lines))
    return Path(path)


def _header(meta: dict[str, Any]) -> list[str]:
    """The title and the audited model, data and split from `meta`, and why the audit exists."""
    return [
        f"# Shortcut audit of `{meta['model']}`",
        "",
        f"Model {meta['arch']} (weights sha256 `{meta['weights_sha256']}`), data `{meta['data']}`, "
        f"split `{meta['split']}`, test subset. Created {meta['created']}.",
        "",
        "The cxr data ties source to label: every covid image is web-collected, every normal and nearly "
        "every pneumonia image comes from NIH. A model can score by recognising the hospital. "
        "These tests look for that.",
    ]


def _findings(findings: list[str]) -> list[str]:
    """The Findings section: one bullet per finding, or a note that no part ran."""
    return ["", "## Findings", "", *([f"- {f}" for f in findings] or ["- (no part run)"])]


def _per_source_section(result: dict[str, Any]) -> list[str]:
    """The audited model's figures per source as a table, then the part's note; [] without the part."""
    if "per_source" not in result:
        return []
    ps = result["per_source"]
    lines = [
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
    return [*lines, "", ps["note"]]


def _masking_section(result: dict[str, Any]) -> list[str]:
    """Lungs masked / lungs only: the table per box subset and condition, one finding line per subset, the
    plot; just the reason when the part was skipped; [] without the part."""
    if "masking" not in result:
        return []
    mk = result["masking"]
    if "skipped" in mk:
        return ["", "## Lungs masked / lungs only", "", f"Skipped: {mk['skipped']}."]
    source = mk.get("lung_source", "boxes")
    compare = []
    if "comparison" in mk:
        cmp = mk["comparison"]
        compare = ["", f"Segmented lungs against boxes, all test images: {cmp['finding']}", "",
                   "| condition | COVID AUC segmented | COVID AUC boxes | difference | accuracy segmented | "
                   "accuracy boxes |", "|---|---|---|---|---|---|",
                   *[f"| {c} | {_f(cmp[c]['covid_auc']['segmented'])} | {_f(cmp[c]['covid_auc']['boxes'])} | "
                     f"{_f(cmp[c]['covid_auc']['difference'])} | {_f(cmp[c]['accuracy']['segmented'])} | "
                     f"{_f(cmp[c]['accuracy']['boxes'])} |" for c in CONDITIONS[1:] if c in cmp]]
    return [
        "",
        "## Lungs masked / lungs only",
        "",
        f"Lungs of the table below: {source}. " + (mk.get("segment_note", "") + " " if source == "segmenter" else "")
        + f"Lung boxes: {mk['n_annotated']} test images with annotated boxes, {mk['n_atlas']} with atlas "
        f"boxes. {mk['box_note']} The lungs are blacked out (set to 0) in the preprocessed image, "
        "after CLAHE; the first column is the images' box kind.",
        "",
        "| boxes | n | chance | condition | accuracy | macro-F1 | COVID AUC |",
        "|---|---|---|---|---|---|---|",
        *_masking_rows(mk["subsets"]),
        *_masking_notes(mk["subsets"]),
        "",
        "Annotated boxes exist only for Cohen images (mostly covid), so that subset's chance "
        "rate is high; the `all` row is the one to read first.",
        *compare,
        "",
        "![masking](masking.png)",
    ]


def _masking_rows(subsets: dict[str, Any]) -> list[str]:
    """One table row per (box subset with images, condition)."""
    lines = []
    for s in BOX_SUBSETS:
        e = subsets[s]
        if e.get("n"):
            lines += [f"| {s} | {e['n']} | {_f(e['chance'])} | {c} | {_f(e[c]['accuracy'])} | "
                      f"{_f(e[c]['macro_f1'])} | {_f(e[c]['covid_auc'])} |" for c in CONDITIONS]
    return lines


def _masking_notes(subsets: dict[str, Any]) -> list[str]:
    """One bullet per box subset with images: its findings joined, the empty ones left out."""
    lines = []
    for s in BOX_SUBSETS:
        e = subsets[s]
        if e.get("n"):
            notes = [e["finding"], e["covid_finding"], e["collapse_note"]]
            lines.append(f"- {s} boxes: " + "; ".join(n for n in notes if n) + ".")
    return lines


def _probe_section(result: dict[str, Any]) -> list[str]:
    """The source probe's split, figures, finding and plot; [] without the part."""
    if "probe" not in result:
        return []
    pr = result["probe"]
    return [
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


def _loso_section(result: dict[str, Any]) -> list[str]:
    """Leave one source out: a row per held-out source, the note, the sources not held out, the plot; []
    without the part."""
    if "loso" not in result:
        return []
    lo = result["loso"]
    lines = [
        "",
        "## Leave one source out",
        "",
        "Each model is the audited recipe trained without one source, then tested on that source. "
        "`internal` is the audited model on that source's images in the internal test split.",
        "",
        "| held-out source | n | held-out accuracy | internal accuracy | gap | held-out recall | note |",
        "|---|---|---|---|---|---|---|",
        *(_loso_row(s, e) for s, e in lo["sources"].items()),
        "",
        lo["note"],
    ]
    if lo["skipped"]:
        lines += ["", "Not held out: " + ", ".join(f"{k} ({v})" for k, v in lo["skipped"].items())]
    return [*lines, "", "![loso](loso.png)"]


def _loso_row(source: str, e: dict[str, Any]) -> str:
    """The table row of one held-out source `source` from its LOSO entry `e`."""
    h = e["held_out"]
    rec = ", ".join(f"{c} {v:.2f}" for c, v in h["recall"].items())
    return (f"| {source} | {h['n']} | {_f(h['accuracy'])} | {_f(e.get('internal', {}).get('accuracy'))} | "
            f"{_f(e.get('gap'))} | {rec} | {_loso_note(e)} |")


def _reproducibility(meta: dict[str, Any]) -> list[str]:
    """The seeds, bootstrap, budget, hashes and versions from `meta`, ending the file with a newline."""
    training = (f"Seed {meta['seed']} (splits, bootstrap; training seed {meta['training_seed']}), "
                f"bootstrap {meta['n_boot']} resamples of split_group, budget {meta['budget_minutes_per_model']} "
                f"min per trained model, epochs {meta['loso_epochs'] or 'as the recipe'}. "
                if meta.get("recipe") else
                f"Seed {meta['seed']} (bootstrap), {meta['n_boot']} resamples of split_group; no model trained. ")
    return [
        "",
        "## Reproducibility",
        "",
        training +
        f"Manifest sha256 `{meta['manifest_sha256']}`, split sha256 `{meta['split_sha256']}`. "
        "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".",
        "",
    ]


# The parts' sections in the order they appear in audit.md; each returns [] when its part did not run.
SECTIONS: tuple[Callable[[dict[str, Any]], list[str]], ...] = (
    _per_source_section,
    _masking_section,
    _probe_section,
    _loso_section,
)
