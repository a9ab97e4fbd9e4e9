"""Shortcut audit of a trained classifier: does it read the lungs, or recognise the hospital?

In the cxr data source and label go together (every covid image is web-collected, every normal and
nearly every pneumonia image is from NIH), so a model can score by recognising where an image came
from. `run_audit` checks this in four parts, each optional:

- per_source: the model's figures per source on the split's test subset.
- masking: the same test images with the lung boxes blacked out ("lungs_masked") and with everything
  but the lung boxes blacked out ("lungs_only"). A model that stays accurate with no lung visible
  reads something else. Boxes come from the COCO lung annotations where an image has them, else from
  an atlas (the mean normalised boxes of the annotated images).
- probe: the audited recipe (architecture, preprocessing, augmentation) trained to predict the
  source instead of the label. High accuracy means the images carry the hospital in them.
- loso: leave one source out: the recipe trained without a source and tested on it.

It writes `audit.json`, `audit.md` (plain-language findings) and PNG plots into `out_dir`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cxrscreen.audit.loso import _safe, loso_one
from cxrscreen.audit.masking import PARTS, _summary, masking_report, masking_set
from cxrscreen.audit.plots import plot_loso, plot_masking, plot_masking_examples, plot_probe
from cxrscreen.audit.probe import _pool, _recipe, source_probe
from cxrscreen.audit.report import write_markdown
from cxrscreen.data.lung_boxes import LungBoxes, default_annotations_path
from cxrscreen.data.manifest import manifest_csv
from cxrscreen.engine.setup import pick_device
from cxrscreen.errors import CXRError
from cxrscreen.evaluation.evaluate import evaluate_run
from cxrscreen.io.files import file_sha256, write_json
from cxrscreen.runs.provenance import provenance
from cxrscreen.runs.run_dir import load_run


# ------------------------------------------------------------------------------------------------- audit
def run_audit(
    run_dir: Path,
    data_dir: Path,
    split_csv: Path,
    out_dir: Path,
    *,
    budget_minutes_per_model: float | None = 5.0,
    loso_epochs: int | None = None,
    parts: Sequence[str] = PARTS,
    cache_dir: Path | None = None,
    n_boot: int = 500,
    seed: int = 0,
    lung_boxes: Path | None = None,
    loso_sources: Sequence[str] | None = None,
    min_source_images: int = 50,
    device: str | None = None,
    log: Callable[[str], None] = print,
    progress_factory: Callable[[str, int], Any] | None = None,
) -> dict[str, Any]:
    """Audit a run for source shortcuts; writes out_dir/audit.json, audit.md and PNG plots. Returns the JSON.

    budget_minutes_per_model / loso_epochs: time budget and epochs of each model the audit trains (the
    source probe and every LOSO model); None keeps the recipe's value. lung_boxes: COCO file (default
    <data>/annotations/lung_boxes.coco.json). loso_sources: sources to hold out (default: every source
    with >= min_source_images images in the split). device: None keeps the recipe's (training) and
    picks cuda when available (evaluation). LOSO runs live in out_dir/loso/<source>/run and resume.
    audit.json is rewritten after each part.
    """
    run_dir, data_dir, split_csv, out_dir = Path(run_dir), Path(data_dir), Path(split_csv), Path(out_dir)
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise CXRError(f"unknown audit part(s) {', '.join(sorted(unknown))}; use {', '.join(PARTS)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    eval_device = pick_device(device or "auto")
    run = load_run(run_dir, device=eval_device)
    if not run.task.has_logits:
        raise CXRError("the audit needs a classifier run", run_dir)
    cfg = _recipe(run, budget_minutes=budget_minutes_per_model, epochs=loso_epochs, cache_dir=cache_dir, device=device)
    eval_cache = cache_dir if cache_dir is not None else (Path(cfg.cache_dir) if cfg.cache_dir else None)
    result: dict[str, Any] = {
        "meta": {
            "model": str(run_dir),
            "arch": run.arch,
            "weights_sha256": run.config.get("weights_sha256"),
            "data": str(data_dir),
            "manifest_sha256": file_sha256(manifest_csv(data_dir)),
            "split": str(split_csv),
            "split_sha256": file_sha256(split_csv),
            "subset": "test",
            "parts": [p for p in PARTS if p in parts],
            "seed": seed,
            "training_seed": cfg.seed,
            "n_boot": n_boot,
            "budget_minutes_per_model": budget_minutes_per_model,
            "loso_epochs": loso_epochs,
            "recipe": cfg.to_dict(),
            "preprocess": run.preprocess.to_dict(),
            **provenance(),
        },
        "findings": [],
        "plots": [],
    }

    def save() -> None:
        write_json(out_dir / "audit.json", result)

    internal: dict[str, Any] | None = None
    if "per_source" in parts or "loso" in parts:
        log("evaluating the audited model on the test subset")
        ev = evaluate_run(
            run, data_dir, split_csv=split_csv, subset="test", n_boot=n_boot, seed=seed, cache_dir=eval_cache
        )
        write_json(out_dir / "per_source_eval.json", ev)
        internal = {s: _summary(r) for s, r in ev["per_source"].items()}
        if "per_source" in parts:
            single = [s for s, v in internal.items() if len(v["support"]) == 1]
            result["per_source"] = {
                "overall": _summary(ev),
                "sources": internal,
                "note": (
                    "A source with a single class (" + ", ".join(single) + ") can be scored perfectly by "
                    "recognising the source; its accuracy says nothing about the disease."
                )
                if single
                else "Every source in the test subset holds more than one class.",
            }
            accs = {s: v["accuracy"] for s, v in internal.items() if v["accuracy"] is not None}
            if accs:
                lo, hi = min(accs, key=accs.get), max(accs, key=accs.get)  # type: ignore[arg-type]
                result["findings"].append(
                    f"Per source, test accuracy runs from {accs[lo]:.2f} ({lo}) to {accs[hi]:.2f} ({hi})."
                )
            save()

    if "masking" in parts:
        path = Path(lung_boxes) if lung_boxes is not None else default_annotations_path(data_dir)
        if not path.is_file():
            result["masking"] = {"skipped": f"no lung-box annotations at {path}"}
            result["findings"].append(f"Masking test skipped: no lung-box annotations at {path}.")
        else:
            log("masking test: lungs masked / lungs only")
            boxes = LungBoxes.from_coco(path)
            ms = masking_set(run, data_dir, split_csv, boxes, cache_dir=eval_cache)
            mk = masking_report(run, ms, n_boot=n_boot, seed=seed)
            mk.update({"lung_boxes": boxes.path, "lung_boxes_sha256": boxes.sha256, "atlas": boxes.atlas})
            result["masking"] = mk
            result["findings"].append(mk["finding"])
            if ms.data.labels.size:
                result["plots"].append(str(plot_masking(mk, out_dir / "masking.png")))
                result["plots"].append(str(plot_masking_examples(ms, out_dir / "masking_examples.png")))
        save()

    pool = _pool(data_dir, split_csv) if ("probe" in parts or "loso" in parts) else None
    if "probe" in parts:
        assert pool is not None
        log("source probe: training the recipe to name the source")
        pr = source_probe(cfg, data_dir, pool, out_dir / "probe", seed=seed, log=log)
        result["probe"] = pr
        result["findings"].append(pr["finding"])
        result["plots"].append(str(plot_probe(pr, out_dir / "probe.png")))
        save()

    if "loso" in parts:
        assert pool is not None and internal is not None
        counts = pool["source"].value_counts()
        if loso_sources is not None:
            missing = [s for s in loso_sources if s not in counts]
            if missing:
                raise CXRError(f"unknown source(s) {', '.join(missing)}; known: {', '.join(sorted(counts.index))}")
            chosen = list(loso_sources)
        else:
            chosen = sorted(s for s, n in counts.items() if n >= min_source_images)
        lo: dict[str, Any] = {
            "sources": {},
            "skipped": {
                s: f"{n} images, " + ("not chosen" if loso_sources is not None else f"fewer than {min_source_images}")
                for s, n in counts.items()
                if s not in chosen
            },
            "min_source_images": min_source_images,
            "note": (
                "Holding out a source that is the only source of a class (e.g. covid-cxnet is all covid, "
                "rsna all normal) means that class's test images come from a hospital the model never "
                "saw: the real question of external validity. A large gap says the internal figures "
                "lean on recognising the source. The held-out figures count only the source's own "
                "images; images of other sources linked to it by split_group also sit in the test set "
                "and are left out of them."
            ),
        }
        result["loso"] = lo
        for s in chosen:
            log(f"leave one source out: {s}")
            lo["sources"][s] = loso_one(
                cfg,
                data_dir,
                pool,
                s,
                out_dir / "loso" / _safe(s),
                internal,
                seed=seed,
                n_boot=n_boot,
                device=eval_device,
                cache_dir=eval_cache,
                log=log,
                progress_factory=progress_factory,
            )
            save()
        gaps = {s: e["gap"] for s, e in lo["sources"].items() if e.get("gap") is not None}
        big = {s: g for s, g in gaps.items() if g > 0.1}
        if big:
            result["findings"].append(
                "Held out, "
                + ", ".join(f"{s} loses {g:.2f} accuracy" for s, g in big.items())
                + " against the internal test: the internal figures do not carry over to "
                "an unseen hospital."
            )
        elif gaps:
            result["findings"].append("Held-out sources score within 0.1 of the internal test figures.")
        if lo["sources"]:
            result["plots"].append(str(plot_loso(lo, out_dir / "loso.png")))
        save()

    write_markdown(result, out_dir / "audit.md")
    save()
    log(f"wrote {out_dir / 'audit.json'} and {out_dir / 'audit.md'}")
    return result



