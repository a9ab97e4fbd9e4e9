"""The model card's severity section, from severity.json (written by `cxrscreen severity fit`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cxrscreen.io.files import write_json
from cxrscreen.severity.model import severity_info
from cxrscreen.severity.zones import ESTIMATE_NOTE

START, END = "<!-- severity:start -->", "<!-- severity:end -->"


def _ci(d: dict[str, Any]) -> str:
    lo, hi = d["ci95"]
    return f"{d['value']:.2f} [{lo:.2f}, {hi:.2f}]"


# the targets (issue 13): MAE at most, Pearson r at least
GOALS: dict[str, dict[str, float]] = {"geographic_extent": {"mae": 1.0, "pearson_r": 0.80},
                                      "opacity": {"mae": 0.7, "pearson_r": 0.80}}


def goals_status(cv: dict[str, Any]) -> str:
    """Which of the issue's targets the cross-validated point figures reach, in words."""
    met, missed = [], []
    for t, goal in GOALS.items():
        for m, bound in goal.items():
            v = cv[t][m]["value"]
            ok = v <= bound if m == "mae" else v >= bound
            (met if ok else missed).append(f"{t.replace('_', ' ')} {'MAE' if m == 'mae' else 'r'} {v:.2f} "
                                           f"({'<=' if m == 'mae' else '>='} {bound:g})")
    if not missed:
        return "All of the issue's targets are reached by the point figures: " + ", ".join(met) + "."
    return ("The issue's targets are not all reached: missed " + ", ".join(missed) +
            ("; reached " + ", ".join(met) if met else "") + ".")


def _describe(f: dict[str, Any]) -> str:
    p = f["preprocess"]
    pooling = {"lungs": "each lung's atlas box averaged separately",
               "lung_masks": "each segmented lung averaged separately"}.get(f.get("pooling", "image"), "averaged")
    return (f"{f['backbone']} {f['arch'].removeprefix('tf_')} features ({', '.join(f['blocks'])}, {pooling}"
            f"{', averaged with the mirrored image' if f.get('flip') else ''}; {p['image_size']} px, "
            f"{p['resize_mode']}, CLAHE {'on' if p['clahe'] else 'off'})")


def card_section(info: dict[str, Any]) -> list[str]:
    """Markdown lines of the severity section."""
    alphas = ", ".join(f"{k} {v:.3g}" for k, v in info["alphas"].items())
    n = (info.get("data") or {}).get("n_images", 90)  # regressors saved before the count was recorded: 90
    lines = [START, "## COVID-19 severity (`predict --severity`)", "",
             f"Ridge regression ({info['regressor']}; penalty {alphas}, chosen by an inner grouped "
             f"5-fold) of the geographic extent (0-8) and opacity (0-6) scores of Cohen et al. ({n} COVID images "
             f"of `../shared/data/cxr`, mean of three radiologists), on {_describe(info['features'])}; feature set "
             f"`{info.get('candidate')}`.", ""]
    cv = info.get("cv")
    if cv:
        ref = info.get("reference") or {}
        s = cv["settings"]
        nested = "n_candidates" in cv
        what = (f"nested: in each outer fold the feature set among {cv['n_candidates']} candidates and the penalties "
                "were chosen by an inner grouped CV on its training images only" if nested else
                "this feature set's own figures, chosen on the same folds (optimistic)")
        lines += [f"Cross-validated ({s['repeats']} x {s['k']}-fold grouped by split_group; {what}; 95 % CI over "
                  "bootstrap resamples of split_groups; `docs/results/severity/cv.json`):", "",
                  "| score | MAE | Pearson r | Cohen et al. MAE | Cohen et al. r |", "|---|---|---|---|---|"]
        for t in ("geographic_extent", "opacity"):
            r = ref.get(t, {})
            lines.append(f"| {t} | {_ci(cv[t]['mae'])} | {_ci(cv[t]['pearson_r'])} | {r.get('mae', '')} | "
                         f"{r.get('pearson_r', '')} |")
        lines.append("")
        if nested:
            own = cv["candidate"]
            lines += [f"The shipped feature set is the one the nested procedure chose most often "
                      f"({cv['chosen_counts'].get(info.get('candidate'), 0)} of "
                      f"{sum(cv['chosen_counts'].values())} outer folds); its own CV figures, extent MAE "
                      f"{_ci(own['geographic_extent']['mae'])}, opacity MAE {_ci(own['opacity']['mae'])}, are "
                      "optimistic as a choice among the candidates.", ""]
        lines += [goals_status(cv) + " Cohen et al.'s features were pretrained on large CXR collections; these "
                  f"are ImageNet features fitted on {n} images.", ""]
    lines += [
        "- Given only for an image the classifier does not call normal and the gate does not flag.",
        "- Per lung (right, left: 0-4) and six zones: " + ESTIMATE_NOTE,
        "- Lung boxes: the segmented lungs' (`cxrscreen.lungs`); for a lung the segmenter does not find, the atlas "
        "(mean annotated boxes) unless `--localizer RUN` is given; no localizer is "
        "bundled (its grouped-CV mean IoU, 0.735, is close to the atlas's 0.701)."
        + {"lungs": " The regressor's per-lung features always use the atlas boxes, as fitted.",
           "lung_masks": " The regressor's per-lung features are averaged over the segmented lungs (the atlas box "
                         "for a lung not found), as fitted."}.get(info["features"].get("pooling"), ""),
        f"- Trained on {n} web-collected images (figures from papers, Radiopaedia, ...): nothing is known of how it "
        "scores films from a hospital; the scores are not validated for any clinical use.",
        END, ""]
    return lines


def update_card(folder: str | Path) -> bool:
    """Replace (or append) the severity section of folder's MODEL_CARD.md and model_card.json["severity"]
    from its severity.json; False when there is no card or no regressor."""
    folder = Path(folder)
    info = severity_info(folder)
    md, js = folder / "MODEL_CARD.md", folder / "model_card.json"
    if info is None or not md.is_file():
        return False
    text = md.read_text()
    section = "\n".join(card_section(info))
    if START in text and END in text:
        text = text[:text.index(START)] + section.rstrip("\n") + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    md.write_text(text)
    if js.is_file():
        card = json.loads(js.read_text())
        card["severity"] = info
        write_json(js, card)
    return True
