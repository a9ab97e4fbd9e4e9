"""Shortcut audit of a trained classifier: does it read the lungs, or recognise the hospital?

In the cxr data source and label go together (every covid image is web-collected, every normal and
nearly every pneumonia image is from NIH), so a model can score by recognising where an image came
from. `run_audit` checks this in four parts, each optional:

- per_source: the model's figures per source on the split's test subset.
- masking: the same test images with the lungs blacked out ("lungs_masked") and with everything
  but the lungs blacked out ("lungs_only"). A model that stays accurate with no lung visible
  reads something else. The lungs are the bundled segmenter's masks, slightly dilated (default), or
  lung boxes (`lung_source="boxes"`); boxes come from the COCO lung annotations where an image has
  them, else from an atlas (the mean normalised boxes of the annotated images). With the segmenter the
  boxes' figures are computed too and the two compared.
- probe: the audited recipe (architecture, preprocessing, augmentation) trained to predict the
  source instead of the label. High accuracy means the images carry the hospital in them.
- loso: leave one source out: the recipe trained without a source and tested on it.

It writes `audit.json`, `audit.md` (plain-language findings) and PNG plots into `out_dir`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxrscreen.audit.loso import _safe, loso_one
from cxrscreen.audit.masking import LUNG_SOURCES, PARTS, _summary, masking_report, masking_set
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
from cxrscreen.runs.run_dir import LoadedRun, load_run


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
    lung_source: str = "segmenter",
    loso_sources: Sequence[str] | None = None,
    min_source_images: int = 50,
    device: str | None = None,
    log: Callable[[str], None] = print,
    progress_factory: Callable[[str, int], Any] | None = None,
) -> dict[str, Any]:
    """Audit a run for source shortcuts; writes out_dir/audit.json, audit.md and PNG plots. Returns the JSON.

    budget_minutes_per_model / loso_epochs: time budget and epochs of each model the audit trains (the
    source probe and every LOSO model); None keeps the recipe's value. lung_boxes: COCO file (default
    <data>/annotations/lung_boxes.coco.json). lung_source: "segmenter" (segmented lungs, compared with the
    boxes) or "boxes" (the masking part's lungs). loso_sources: sources to hold out (default: every source
    with >= min_source_images images in the split). device: None keeps the recipe's (training) and
    picks cuda when available (evaluation). LOSO runs live in out_dir/loso/<source>/run and resume.
    audit.json is rewritten after each part.
    """
    run_dir, data_dir, split_csv, out_dir = Path(run_dir), Path(data_dir), Path(split_csv), Path(out_dir)
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise CXRError(f"unknown audit part(s) {', '.join(sorted(unknown))}; use {', '.join(PARTS)}")
    if lung_source not in LUNG_SOURCES:
        raise CXRError(f"unknown lung source {lung_source!r}; use {', '.join(LUNG_SOURCES)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    eval_device = pick_device(device or "auto")
    run = load_run(run_dir, device=eval_device)
    if not run.task.has_logits:
        raise CXRError("the audit needs a classifier run", run_dir)
    trains = [p for p in parts if p in TRAINING_PARTS]
    if trains and _is_feature_head(run):
        raise CXRError(f"the audit's {' and '.join(trains)} part(s) retrain the run's fine-tuning recipe, and this "
                       "is a feature-head run (`cxrscreen fit-head`): its leave-one-source-out figures come from "
                       "`cxrscreen select` (docs/results/select_all); audit it with --parts per_source,masking",
                       run_dir)
    cfg = (_recipe(run, budget_minutes=budget_minutes_per_model, epochs=loso_epochs, cache_dir=cache_dir,
                   device=device) if trains else None)
    eval_cache = cache_dir if cache_dir is not None else (Path(cfg.cache_dir) if cfg and cfg.cache_dir else None)
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
            "training_seed": cfg.seed if cfg else None,
            "n_boot": n_boot,
            "lung_source": lung_source if "masking" in parts else None,
            "budget_minutes_per_model": budget_minutes_per_model,
            "loso_epochs": loso_epochs,
            "recipe": cfg.to_dict() if cfg else None,  # the recipe the probe / LOSO models are trained with
            "preprocess": run.preprocess.to_dict(),
            **provenance(),
        },
        "findings": [],
        "plots": [],
    }

    ctx = AuditContext(run=run, cfg=cfg, data_dir=data_dir, split_csv=split_csv, out_dir=out_dir, n_boot=n_boot,
                       seed=seed, eval_cache=eval_cache, eval_device=eval_device, lung_boxes=lung_boxes,
                       lung_source=lung_source, loso_sources=loso_sources, min_source_images=min_source_images, log=log,
                       progress_factory=progress_factory, save=lambda: write_json(out_dir / "audit.json", result))
    for name in PARTS:
        if name not in parts:
            continue
        part = AUDIT_PARTS[name](ctx)
        result[name] = part.report
        result["findings"].extend(part.findings)
        result["plots"].extend(str(p) for p in part.plots)
        ctx.save()

    write_markdown(result, out_dir / "audit.md")
    ctx.save()
    log(f"wrote {out_dir / 'audit.json'} and {out_dir / 'audit.md'}")
    return result


TRAINING_PARTS = ("probe", "loso")  # the parts that train models with the audited run's recipe


def _is_feature_head(run: LoadedRun) -> bool:
    """A frozen-backbone feature-head run (`fit-head`): no fine-tuning recipe for the probe / LOSO to retrain."""
    from cxrscreen.models.registry import get_spec

    return get_spec(run.arch).library == "feature_head"


# ------------------------------------------------------------------------------------------------- parts
@dataclass
class AuditContext:
    """What every audit part reads: the audited run, the recipe its models are trained with, the data, the output
    folder and the options. `internal` (the model's per-source test figures) and `pool` (the split's images with
    their sources) are computed once, by the first part that needs them; `save` rewrites audit.json."""

    run: Any
    cfg: Any
    data_dir: Path
    split_csv: Path
    out_dir: Path
    n_boot: int
    seed: int
    eval_cache: Path | None
    eval_device: Any
    lung_boxes: Path | None
    lung_source: str
    loso_sources: Sequence[str] | None
    min_source_images: int
    log: Callable[[str], None]
    progress_factory: Callable[[str, int], Any] | None
    save: Callable[[], None]
    _internal: dict[str, Any] | None = None
    _overall: dict[str, Any] | None = None
    _pool: Any = None

    def internal(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(per-source summaries, overall summary) of the audited model on the split's test subset."""
        if self._internal is None:
            self.log("evaluating the audited model on the test subset")
            ev = evaluate_run(self.run, self.data_dir, split_csv=self.split_csv, subset="test", n_boot=self.n_boot,
                              seed=self.seed, cache_dir=self.eval_cache)
            write_json(self.out_dir / "per_source_eval.json", ev)
            self._internal = {s: _summary(r) for s, r in ev["per_source"].items()}
            self._overall = _summary(ev)
        assert self._overall is not None
        return self._internal, self._overall

    def pool(self) -> Any:
        """The split's train+val+test images with their sources (what the probe and LOSO train on)."""
        if self._pool is None:
            self._pool = _pool(self.data_dir, self.split_csv)
        return self._pool


@dataclass
class PartResult:
    """One audit part's outcome: its section of audit.json, its plain-language findings, the plots it wrote."""

    report: dict[str, Any]
    findings: list[str] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)


def per_source_part(ctx: AuditContext) -> PartResult:
    """The model's test figures per source; a single-class source is named (it can be scored by its source)."""
    internal, overall = ctx.internal()
    single = [s for s, v in internal.items() if len(v["support"]) == 1]
    note = ("A source with a single class (" + ", ".join(single) + ") can be scored perfectly by recognising the "
            "source; its accuracy says nothing about the disease.") if single else \
        "Every source in the test subset holds more than one class."
    findings = []
    accs = {s: v["accuracy"] for s, v in internal.items() if v["accuracy"] is not None}
    if accs:
        lo, hi = min(accs, key=accs.get), max(accs, key=accs.get)  # type: ignore[arg-type]
        findings.append(f"Per source, test accuracy runs from {accs[lo]:.2f} ({lo}) to {accs[hi]:.2f} ({hi}).")
    return PartResult({"overall": overall, "sources": internal, "note": note}, findings)


def masking_part(ctx: AuditContext) -> PartResult:
    """The test images with the lungs (segmented, or boxes) blacked out and with only the lungs left; with
    segmented lungs the boxes' figures too, on the same images."""
    path = Path(ctx.lung_boxes) if ctx.lung_boxes is not None else default_annotations_path(ctx.data_dir)
    if not path.is_file():
        return PartResult({"skipped": f"no lung-box annotations at {path}"},
                          [f"Masking test skipped: no lung-box annotations at {path}."])
    ctx.log(f"masking test: lungs masked / lungs only ({ctx.lung_source})")
    boxes = LungBoxes.from_coco(path)
    ms = masking_set(ctx.run, ctx.data_dir, ctx.split_csv, boxes, cache_dir=ctx.eval_cache,
                     lung_source=ctx.lung_source)
    mk = masking_report(ctx.run, ms, n_boot=ctx.n_boot, seed=ctx.seed)
    mk.update({"lung_boxes": boxes.path, "lung_boxes_sha256": boxes.sha256, "atlas": boxes.atlas})
    plots = []
    if ms.data.labels.size:
        plots = [plot_masking(mk, ctx.out_dir / "masking.png"),
                 plot_masking_examples(ms, ctx.out_dir / "masking_examples.png")]
    return PartResult(mk, [mk["finding"]], plots)


def probe_part(ctx: AuditContext) -> PartResult:
    """The audited recipe trained to name each image's source instead of its label."""
    ctx.log("source probe: training the recipe to name the source")
    pr = source_probe(ctx.cfg, ctx.data_dir, ctx.pool(), ctx.out_dir / "probe", seed=ctx.seed, log=ctx.log)
    return PartResult(pr, [pr["finding"]], [plot_probe(pr, ctx.out_dir / "probe.png")])


def loso_part(ctx: AuditContext) -> PartResult:
    """Leave one source out: the recipe trained without each chosen source and tested on it."""
    internal, _ = ctx.internal()
    pool = ctx.pool()
    counts = pool["source"].value_counts()
    if ctx.loso_sources is not None:
        missing = [s for s in ctx.loso_sources if s not in counts]
        if missing:
            raise CXRError(f"unknown source(s) {', '.join(missing)}; known: {', '.join(sorted(counts.index))}")
        chosen = list(ctx.loso_sources)
    else:
        chosen = sorted(s for s, n in counts.items() if n >= ctx.min_source_images)
    why = "not chosen" if ctx.loso_sources is not None else f"fewer than {ctx.min_source_images}"
    lo: dict[str, Any] = {
        "sources": {},
        "skipped": {s: f"{n} images, {why}" for s, n in counts.items() if s not in chosen},
        "min_source_images": ctx.min_source_images,
        "note": LOSO_NOTE,
    }
    for s in chosen:
        ctx.log(f"leave one source out: {s}")
        lo["sources"][s] = loso_one(ctx.cfg, ctx.data_dir, pool, s, ctx.out_dir / "loso" / _safe(s), internal,
                                    seed=ctx.seed, n_boot=ctx.n_boot, device=ctx.eval_device,
                                    cache_dir=ctx.eval_cache, log=ctx.log, progress_factory=ctx.progress_factory)
    findings = []
    gaps = {s: e["gap"] for s, e in lo["sources"].items() if e.get("gap") is not None}
    big = {s: g for s, g in gaps.items() if g > 0.1}
    if big:
        findings.append("Held out, " + ", ".join(f"{s} loses {g:.2f} accuracy" for s, g in big.items())
                        + " against the internal test: the internal figures do not carry over to an unseen hospital.")
    elif gaps:
        findings.append("Held-out sources score within 0.1 of the internal test figures.")
    plots = [plot_loso(lo, ctx.out_dir / "loso.png")] if lo["sources"] else []
    return PartResult(lo, findings, plots)


LOSO_NOTE = (
    "Holding out a source that is the only source of a class (e.g. covid-cxnet is all covid, rsna all normal) means "
    "that class's test images come from a hospital the model never saw: the real question of external validity. A "
    "large gap says the internal figures lean on recognising the source. The held-out figures count only the "
    "source's own images; images of other sources linked to it by split_group also sit in the test set and are left "
    "out of them."
)

# The parts in the order they run (and appear in audit.json); each returns its section, findings and plots.
AUDIT_PARTS: dict[str, Callable[[AuditContext], PartResult]] = {
    "per_source": per_source_part,
    "masking": masking_part,
    "probe": probe_part,
    "loso": loso_part,
}
