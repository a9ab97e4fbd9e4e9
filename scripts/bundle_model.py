"""Copy a trained, calibrated run into the package as the bundled default model, with its model card.

    python scripts/bundle_model.py --run runs/default --onnx --eval docs/results/default_model/eval_cxr_test.json \
        --eval-siim docs/results/default_model/eval_siim_test.json \
        --eval-external docs/results/default_model/eval_external.json \
        --select docs/results/select/select.json --candidate lite0_224_blocks2-6_merged \
        --gate docs/results/gate_ood.json --command "$(cat docs/results/default_model/command.txt)"

Writes src/cxrscreen/weights/{model.safetensors (float16), config.json, model_card.json, MODEL_CARD.md}, and with
--onnx the ONNX export of the bundled (float16-rounded) weights, model.onnx, whose sha256 goes into config.json as
`onnx_sha256`. A feature-head run's replay.npz (what `cxrscreen adapt` replays) is copied along.
Every figure in the card is read from the JSON files named on the command line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from cxrscreen.evaluation.formatting import format_ci
from cxrscreen.models.registry import get_spec
from cxrscreen.runs.decision import DecisionRule
from cxrscreen.runs.run_dir import load_run, save_weights, write_config

WEIGHTS = Path(__file__).resolve().parents[1] / "src" / "cxrscreen" / "weights"


def _load(path: Path | None) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path is not None and path.is_file() else None


def _eval_rows(ev: dict[str, Any]) -> list[str]:
    rows = ["| scope | n | accuracy | macro-F1 | COVID sensitivity [95 % CI] | COVID specificity [95 % CI] "
            "| COVID AUC |", "|---|---|---|---|---|---|---|"]
    for name, r in [("all", ev), *ev.get("per_source", {}).items()]:
        c = r["covid_vs_rest"]
        rows.append(f"| {name} | {r['n']} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} | "
                    f"{format_ci(c['sensitivity'])} | {format_ci(c['specificity'])} | {format_ci(c['auc'])} |")
    return rows


def _weights_text(cfg: dict[str, Any]) -> str:
    tr = cfg["training"]
    if cfg.get("model_options"):
        opts = cfg["model_options"]
        return (f"frozen ImageNet weights (offline, see `cxrscreen.models.efficientnet_lite`, never fine-tuned); the "
                f"global averages of `{', '.join(opts['stages'])}`" + (" (averaged with the mirrored image's)"
                                                                        if opts.get("flip") else "")
                + f" concatenated and standardised, then one linear layer: {tr.get('solver')}, C = {tr['chosen_C']} "
                f"chosen by {tr.get('cv_folds')}-fold patient-grouped cross-validation over {tr.get('cs')}")
    if tr.get("weights") == "imagenet":
        text = "ImageNet weights (offline, see `cxrscreen.models.efficientnet_lite`)"
        if tr.get("linear_probe_epochs"):
            text += (f", {tr['linear_probe_epochs']} epochs of linear probing, then fine-tuning with the backbone at "
                     f"{tr['backbone_lr_scale']} x the head's learning rate")
        if tr.get("frozen"):
            text += f" and `{', '.join(tr['frozen'])}` frozen"
        return text
    return "trained from scratch"


def _loso_rows(audit: dict[str, Any] | None) -> list[str]:
    loso = ((audit or {}).get("loso") or {}).get("sources") or {}
    if not loso:
        return []
    rows = ["| held-out source | train images | accuracy inside (trained with it) | accuracy held out | gap "
            "| recall held out |", "|---|---|---|---|---|---|"]
    for src, e in loso.items():
        if "held_out" not in e:
            continue
        inner, gap = (e.get("internal") or {}).get("accuracy"), e.get("gap")
        rec = ", ".join(f"{c} {v:.2f}" for c, v in e["held_out"]["recall"].items())
        inner_s = "n/a" if inner is None else f"{inner:.3f}"
        gap_s = "n/a" if gap is None else f"{gap:+.3f}"
        rows.append(f"| {src} | {e['train_images']} | {inner_s} | {e['held_out']['accuracy']:.3f} | {gap_s} "
                    f"| {rec} |")
    return rows


def card_markdown(card: dict[str, Any]) -> str:
    """The human-readable model card from the machine-readable one."""
    cfg = card["config"]
    spec = get_spec(cfg["arch"])
    rule = DecisionRule.from_dict(cfg["decision"]) if "decision" in cfg else \
        DecisionRule(threshold=(cfg.get("operating_point") or {}).get("threshold"))
    choice = card.get("decision_choice") or {}
    lines = [
        "# Model card: cxrscreen default model",
        "",
        "**Research use only. Not a medical device; not for diagnosis or patient management.**",
        "",
        "## Model",
        f"- Architecture: `{cfg['arch']}` ({spec.library}), one grey input channel, {cfg['parameters']:,} "
        f"parameters, {_weights_text(cfg)}.",
        f"- Classes: {', '.join(cfg['classes'])}.",
        f"- Weights: `model.safetensors`, stored as float16, sha256 `{cfg['weights_sha256']}` "
        "(checked before every load).",
        f"- Preprocessing: `{json.dumps(cfg['preprocess'])}`: CLAHE, then a centred square crop "
        f"({cfg['preprocess']['center_fraction']:.0%} of the short side) resized to "
        f"{cfg['preprocess']['image_size']} px; no padding bars.",
        f"- Training: `{card['training_command']}`; seed {cfg['seed']}; recipe `{json.dumps(cfg['training'])}`; "
        + (f"{cfg.get('train_seconds')} s on the CPU (feature extraction {cfg.get('feature_seconds')} s, of which "
           f"{(cfg.get('feature_cache') or {}).get('misses')} images computed and "
           f"{(cfg.get('feature_cache') or {}).get('hits')} read from the feature cache; head fit "
           f"{cfg.get('fit_seconds')} s)." if cfg.get("model_options") else
           f"stopped: {cfg.get('stop_reason')}; best epoch {cfg.get('best_epoch')}; "
           f"{cfg.get('train_seconds')} s on the CPU."),
        f"- Package versions: `{json.dumps(cfg['versions'])}`.",
        "",
        "## Data",
        f"- Manifest `{cfg['data']['manifest']}`, sha256 `{cfg['data']['manifest_sha256']}`: "
        + card["data_text"],
        f"- Split `{cfg['data']['split']}` (grouped by `split_group`, stratified by label, seed 0), sha256 "
        f"`{cfg['data']['split_sha256']}`: {cfg['data']['train_images']} train / {cfg['data']['val_images']} val "
        "images; test figures below.",
        "",
    ]
    lines += ["## Decision rule", "", f"The class every output shows and every figure counts: {rule.describe()} "
              "(`cxrscreen.runs.decision`; `predict --argmax` or `--threshold X` change it)."
              + (f" Chosen by `cxrscreen calibrate`: {choice['chosen_by']} ("
                 + ", ".join(f"{c['rule']['rule']} {c['worst']:.3f}" for c in choice["candidates"]) + ")."
                 if choice else ""), ""]
    for key, title in (("eval", "Internal test of ../shared/data/cxr (the shipped decision rule)"),
                       ("eval_external", "External selection set ../shared/data/external (two hospitals in no "
                                         "training source; never fitted on; the shipped decision rule)"),
                       ("eval_op", "Internal test of ../shared/data/cxr (the stored operating point, not shipped)"),
                       ("eval_siim", "Grouped test of ../shared/data/siim (same hospitals for both classes; "
                                     "the shipped decision rule)"),
                       ("eval_siim_op", "Grouped test of ../shared/data/siim (the stored operating point)")):
        ev = card.get(key)
        if ev:
            lines += [f"## {title}", "", *_eval_rows(ev), ""]
    cal = cfg.get("calibration")
    op = cfg.get("operating_point")
    if cal:
        lines += ["## Calibration", "",
                  f"Temperature scaling fitted on val: T = {cal['temperature']:.3f}. Expected calibration error "
                  f"(15 bins) on test {cal['ece_test_before']:.3f} before, {cal['ece_test_after']:.3f} after; "
                  f"on val {cal['ece_val_before']:.3f} before, {cal['ece_val_after']:.3f} after.", ""]
    if op:
        lines += ["## Operating point", "",
                  f"Stored (`--threshold` applies it; shipped only if `decision` says so): COVID when its calibrated "
                  f"probability is >= {op['threshold']:.4f}, the highest "
                  f"threshold reaching sensitivity {op['target_sensitivity']} on val (val sensitivity "
                  f"{op['val_sensitivity']:.3f}, specificity {op['val_specificity']:.3f}; val holds "
                  f"{', '.join(op.get('val_sources') or [])}). On the merged test: sensitivity "
                  f"{format_ci(op['test_sensitivity'])}, specificity {format_ci(op['test_specificity'])}.", ""]
        per = op.get("test_specificity_per_source") or {}
        if per:
            lines += ["COVID specificity at this threshold per source (merged test, non-COVID images):", "",
                      *[f"- {s}: {v['specificity']:.3f} of {v['n_non_covid']}" for s, v in per.items()
                        if v["specificity"] is not None], ""]
    sel = card.get("selection")
    if sel:
        lines += ["## Selection (`cxrscreen select --config configs/select.yaml`)", "",
                  f"Shipped candidate `{sel['shipped']}`; best by the selection score: `{sel['best']}` "
                  f"({sel['chosen_by']}). Scores: " + ", ".join(f"{n} {v:.3f}" for n, v in sel["scores"].items())
                  + ".", "", "Leave-one-source-out of the shipped recipe (the head refitted without the source, "
                  "tested on all its images; grouped 95 % CIs):", "",
                  "| held-out source | n | figure | recall |", "|---|---|---|---|"]
        for src, e in sel["loso"].items():
            auc = f"{e['auc_kind']} AUC {format_ci(e['auc'])}" if e.get("auc") else "one class only"
            rec = ", ".join(f"{c} {format_ci(v)}" for c, v in e["recall"].items())
            lines.append(f"| {src} | {e['n']} | {auc} | {rec} |")
        lines.append("")
    if card.get("audit_findings"):
        lines += ["## Shortcut audit (`cxrscreen audit`)", "", *[f"- {f}" for f in card["audit_findings"]], ""]
        loso = _loso_rows(card.get("audit"))
        if loso:
            lines += ["Leave-one-source-out (each model trained without the source, tested on it):", "", *loso, ""]
    if card.get("gate"):
        g = card["gate"]
        lines += ["## Not-a-chest-X-ray gate (`python benchmarks/gate_ood.py`)", "",
                  f"- Real X-rays it was not fitted on, accepted: {g['real_eval_half']['accepted']['fraction']:.4f} "
                  f"of {g['real_eval_half']['accepted']['n']}.",
                  f"- Non-X-ray kinds used in fitting, flagged: {g['seen_kinds']['flagged']['fraction']:.4f} "
                  f"of {g['seen_kinds']['flagged']['n']}; kinds never shown to it: "
                  f"{g['unseen_kinds']['flagged']['fraction']:.4f} of {g['unseen_kinds']['flagged']['n']}.",
                  "- What it cannot catch: " + " ".join(GATE_LIMITS), ""]
    lines += ["## Intended use", "", *[f"- {s}" for s in card["intended_use"]], "",
              "## Known limits", "", *[f"- {s}" for s in card["limits"]], "",
              "## What was done for generalisation", "", *[f"- {s}" for s in card["generalisation"]], ""]
    return "\n".join(lines)


DATA_TEXT = (
    "the merge (`cxrscreen data build`) of `../shared/data/cxr` (2,989 frontal adult chest X-rays; sources cohen, "
    "covid-cxnet, nih, rsna: COVID web-collected, normal and pneumonia from one US hospital) and "
    "`../shared/data/siim` (4,666 films of COVID and pneumonia-free patients from the same Spanish and US hospital "
    "cohorts). Every cxr image keeps its subset of `configs/splits/cxr_grouped_seed0.csv`."
)
INTENDED_USE = [
    "Research and teaching: reproducing and checking published COVID-19 chest X-ray results, and a baseline "
    "for new work.",
    "Not for clinical decisions. It has not been validated prospectively, on children, or in any hospital.",
]
LIMITS = [
    "Source and label are confounded in the training data: every COVID image is web-collected (figures from "
    "papers, bedside films, arrows and text burned in) and nearly every normal and pneumonia image comes from one "
    "US hospital (NIH). High internal figures can come from recognising the source: with the segmented lungs "
    "blacked out the model still ranks COVID above the rest with AUC 0.85 on the merged test (`cxrscreen audit`, "
    "docs/results/audit).",
    "Labels are noisy (NIH labels were text-mined from reports; Cohen 'pneumonia' includes SARS).",
    "Adults or unknown age only: no paediatric images were used for training; nothing is known of how it does on "
    "children.",
    "siim's 'normal' films are of patients from COVID cohorts (most PCR positive): the model learns what a COVID film "
    "shows, and a COVID patient with a clear film is called normal.",
    "Frontal views only; lateral views, CT and non-X-ray images are meant to be stopped by the gate, which has "
    "its own limits (see above).",
    "A small frozen ImageNet network (EfficientNet-Lite0, 224 px) with a linear head fitted in minutes on a 2-core "
    "CPU: not state of the art, and the leave-one-source-out figures show how far its figures fall on a source it "
    "never saw. A hospital can refit the head on its own films with `cxrscreen adapt`.",
]
GATE_LIMITS = [
    "real lateral films without DICOM tags (only a synthetic lateral-like drawing was tested);",
    "other radiographs (abdomen, limbs, skull, children) and figure crops that are mostly chest;",
    "smooth or blurry low-detail pictures (some flagged only 70-92 % of the time);",
    "rotated or upside-down X-rays (flagged 76 % / 67 %);",
    "colour is only judged on files, not on web uploads or colour DICOMs.",
]
GENERALISATION = [
    "Frozen ImageNet features, never fine-tuned (fine-tuning gave back much of what they carry to unseen hospitals), "
    "pooled from several stages rather than the last only, and a linear head whose penalty is chosen by "
    "patient-grouped cross-validation; the recipe was chosen by `cxrscreen select` on the external set (two "
    "hospitals in no training source, never fitted on) and the worst leave-one-source-out figure.",
    "Centre crop to 90 % of the short side instead of padding: no bars that reveal the source's aspect ratio, and "
    "less of the corners where burned-in text and markers sit.",
    "CLAHE on every image, so that exposure and contrast differ less between hospitals; no augmentation: the "
    "backbone is frozen and the head sees each image's features once.",
    "Class-balanced logistic regression so the rarer class is not ignored.",
    "Data: siim adds COVID and clear films from the same hospitals, so the hospital no longer gives the answer; "
    "the merge was chosen over cxr alone by leave-one-source-out figures of a frozen-feature probe "
    "(`scripts/frozen_probe.py`, docs/results/data_choice/).",
    "Per-source evaluation and tests with the segmented lungs masked (`cxrscreen audit --parts per_source,masking`) "
    "and leave-one-source-out refits of the head (`cxrscreen select`) to measure how much of the score is the "
    "source.",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--eval", type=Path, help="eval JSON of the cxr test under the shipped decision rule")
    ap.add_argument("--eval-op", type=Path, help="eval JSON of the cxr test under the stored operating point")
    ap.add_argument("--eval-siim", type=Path, help="eval JSON of the siim grouped test (shipped rule)")
    ap.add_argument("--eval-siim-op", type=Path, help="eval JSON of the siim grouped test (operating point)")
    ap.add_argument("--probe", type=Path, help="frozen_probe.py JSON (the data choice)")
    ap.add_argument("--audit", type=Path)
    ap.add_argument("--gate", type=Path)
    ap.add_argument("--eval-external", type=Path, help="eval JSON of the external selection set (shipped rule)")
    ap.add_argument("--select", type=Path, help="select.json of `cxrscreen select` (the recipe choice)")
    ap.add_argument("--candidate", help="the shipped candidate's name in --select")
    ap.add_argument("--onnx", action="store_true", help="also write model.onnx and its sha256 (onnx_sha256)")
    ap.add_argument("--command", required=True, help="the exact training command")
    ap.add_argument("--out", type=Path, default=WEIGHTS)
    args = ap.parse_args()

    run = load_run(args.run)
    args.out.mkdir(parents=True, exist_ok=True)
    sha = save_weights(run.model, args.out, dtype=torch.float16)
    config = {**run.config, "weights_sha256": sha, "weights_dtype": "float16",
              "bundled_from": {"run": str(args.run), "weights_sha256_float32": run.config.get("weights_sha256")}}
    replay = args.run / "replay.npz"
    if replay.is_file():
        import shutil

        shutil.copyfile(replay, args.out / "replay.npz")
    for stale in ("onnx_sha256",):
        config.pop(stale, None)
    write_config(args.out, config)
    if args.onnx:
        from cxrscreen.io.files import file_sha256
        from cxrscreen.predict.onnx_export import export_onnx

        info = export_onnx(load_run(args.out), args.out / "model.onnx")
        config["onnx_sha256"] = file_sha256(args.out / "model.onnx")
        config["onnx_export"] = {"opset": info["opset"],
                                 "max_abs_diff_probabilities": info["max_abs_diff_probabilities"]}
        write_config(args.out, config)
    elif (args.out / "model.onnx").is_file():
        (args.out / "model.onnx").unlink()  # an export of other weights must not stay beside these
    audit = _load(args.audit)
    selection = None
    sel = _load(args.select)
    if sel:
        shipped = next((c for c in sel["candidates"] if c["name"] == args.candidate), None)
        if shipped is None:
            raise SystemExit(f"--candidate {args.candidate!r} is not in {args.select}")
        selection = {"shipped": shipped["name"], "best": sel["best"], "chosen_by": sel["chosen_by"],
                     "scores": {c["name"]: c["score"] for c in sel["candidates"]}, "loso": shipped["loso"]}
    card = {
        "name": "cxrscreen default model",
        "config": config,
        "training_command": args.command,
        "eval": _load(args.eval),
        "eval_op": _load(args.eval_op),
        "decision_choice": (_load(args.run / "eval" / "calibration.json") or {}).get("decision"),
        "eval_siim": _load(args.eval_siim),
        "eval_siim_op": _load(args.eval_siim_op),
        "eval_external": _load(args.eval_external),
        "selection": selection,
        "data_choice": _load(args.probe),
        "data_text": DATA_TEXT,
        "audit_findings": (audit or {}).get("findings"),
        "audit": {k: (audit or {}).get(k) for k in ("masking", "probe", "loso")} if audit else None,
        "gate": _load(args.gate),
        "intended_use": INTENDED_USE,
        "limits": LIMITS,
        "generalisation": GENERALISATION,
    }
    (args.out / "model_card.json").write_text(json.dumps(card, indent=2, default=str))
    (args.out / "MODEL_CARD.md").write_text(card_markdown(card))
    from cxrscreen.severity.card import update_card

    update_card(args.out)  # the severity section, when severity.json is bundled (issue 13)
    print(json.dumps({"out": str(args.out), "weights_sha256": sha,
                      "bytes": (args.out / "model.safetensors").stat().st_size}))


if __name__ == "__main__":
    main()
