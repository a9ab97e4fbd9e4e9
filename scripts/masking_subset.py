"""The audit's masking part on a seeded sample of a split's test images: segmented lungs against lung boxes.

A quick check (the full audit is slow): `n` test images drawn stratified by label (seed), a split CSV holding
only them as "test", then `masking_set` + `masking_report` with the bundled classifier and segmenter. Prints
JSON: the sample, both sources' figures on the "all" subset and the comparison.

    python scripts/masking_subset.py --data ../shared/data/cxr --split configs/splits/cxr_grouped_seed0.csv \
        --n 100 --out docs/results/masking_subset_100.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import pandas as pd

from cxrscreen.audit.masking import CONDITIONS, masking_report, masking_set
from cxrscreen.data.lung_boxes import LungBoxes, default_annotations_path
from cxrscreen.predict.predictor import default_model_dir
from cxrscreen.runs.provenance import provenance
from cxrscreen.runs.run_dir import load_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--split", type=Path, required=True)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-boot", type=int, default=200)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    split = pd.read_csv(args.split, dtype=str)
    manifest = pd.read_csv(args.data / "manifest.csv", dtype=str, keep_default_na=False)
    test = split[split["subset"] == "test"].merge(manifest[["image", "label"]], on="image")
    frac = min(1.0, args.n / len(test))
    sample = test.groupby("label", group_keys=False).sample(frac=frac, random_state=args.seed)
    run = load_run(args.model or default_model_dir())
    boxes = LungBoxes.from_coco(default_annotations_path(args.data))
    with tempfile.TemporaryDirectory() as tmp:
        sub = Path(tmp) / "split.csv"
        sample[["image"]].assign(subset="test").to_csv(sub, index=False)
        ms = masking_set(run, args.data, sub, boxes, lung_source="segmenter", cache_dir=Path(tmp) / "cache")
    rep = masking_report(run, ms, n_boot=args.n_boot, seed=args.seed)
    keep = ("n", "chance", "accuracy", "covid_auc", "predicted")
    out = {
        "command": "python scripts/masking_subset.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and k != "out"),
        "model": str(args.model or default_model_dir()),
        "weights_sha256": run.config.get("weights_sha256"),
        "split": str(args.split),
        "seed": args.seed,
        "n": len(ms.kinds),
        "labels": sample["label"].value_counts().to_dict(),
        "n_annotated_boxes": rep["n_annotated"],
        "n_atlas_boxes": rep["n_atlas"],
        "segment_note": rep["segment_note"],
        **{key: {"mean_coverage": rep[key]["mean_coverage"],
                 **{c: {k: rep[key]["subsets"]["all"][c].get(k) for k in keep if k in rep[key]["subsets"]["all"][c]}
                    for c in CONDITIONS}}
           for key in ("segmented", "boxes")},
        "comparison": rep["comparison"],
        "finding": rep["finding"],
        "versions": provenance().get("versions"),
    }
    text = json.dumps(out, indent=2, default=float)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
