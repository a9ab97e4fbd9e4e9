"""The audit's markdown report: the verdicts of every part in words, with their figures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cxrscreen.audit.masking import BOX_SUBSETS, CONDITIONS
from cxrscreen.evaluation.formatting import format_value

# ------------------------------------------------------------------------------------------------ report
_f = format_value  # a figure (or {"value": ...}) to 3 decimals, "n/a" when missing


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

