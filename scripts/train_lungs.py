"""Train the bundled lung segmenter: grouped cross-validation, the cross-source check, the atlas baseline, then
the fit on all masks, written to src/cxrscreen/weights/lungs.{json,safetensors} and docs/results/lungs/cv.json.

    nohup nice python scripts/train_lungs.py --data ../shared/data/cxr --lesions ../shared/data/lesions \
        --epochs 12 > lungs_train.log 2>&1 &

--out sets another model folder (e.g. to try options without touching the bundled model). The two halves can run
apart: --skip-cv fits and writes the model only; --cv-only computes the figures and records them in the existing
lungs.json of --out (its weights untouched; the options must be those the model was fitted with).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from pathlib import Path

from cxrscreen.io.files import write_json
from cxrscreen.lungs.training import (
    TrainOptions,
    attach_record,
    cross_source,
    cross_validate,
    fit_and_save,
    load_examples,
    lung_mask_table,
)
from cxrscreen.runs.provenance import provenance

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cxr")
    ap.add_argument("--lesions", type=Path, default=ROOT.parent / "shared" / "data" / "lesions")
    ap.add_argument("--out", type=Path, default=ROOT / "src" / "cxrscreen" / "weights")
    ap.add_argument("--results", type=Path, default=ROOT / "docs" / "results" / "lungs" / "cv.json")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--folds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--image-size", type=int, default=TrainOptions.image_size,
                    help="the network's input side in pixels (a multiple of 32)")
    ap.add_argument("--decoder-channels", type=int, nargs="+", default=list(TrainOptions.decoder_channels),
                    help="the U-Net decoder's channels, coarse to fine (five numbers)")
    ap.add_argument("--skip-cv", action="store_true", help="only the final fit (no figures recorded)")
    ap.add_argument("--cv-only", action="store_true", help="only the figures, recorded in --out's lungs.json")
    ap.add_argument("--part", choices=("all", "cv", "cross-source"), default="all",
                    help="with --cv-only: only the grouped CV or only the cross-source check (to run them apart; "
                         "each writes its own results file next to --results)")
    args = ap.parse_args()
    opts = TrainOptions(epochs=args.epochs, seed=args.seed, threads=args.threads, image_size=args.image_size,
                        decoder_channels=tuple(args.decoder_channels))
    t0 = time.monotonic()
    args.results.parent.mkdir(parents=True, exist_ok=True)  # before hours of training, not after
    table = lung_mask_table(args.data, args.lesions)
    examples = load_examples(table, opts.preprocess)
    print(f"{len(table)} masks loaded ({time.monotonic() - t0:.0f} s)", flush=True)
    record: dict = {}
    if not args.skip_cv:
        if args.part in ("all", "cv"):
            cv = cross_validate(table, examples, opts, k=args.folds, log=lambda m: print(m, flush=True))
            record["cv"] = {"k": cv["k"], "grouped_by": "split_group", **cv["figures"]}
        if args.part in ("all", "cross-source"):
            record["cross_source"] = cross_source(table, examples, opts, log=lambda m: print(m, flush=True))
        results_path = args.results if args.part == "all" else args.results.with_name(
            f"{args.part.replace('-', '_')}.json")
        write_json(results_path, {"options": asdict(opts), **record, **provenance()})
        print(f"figures written to {results_path}", flush=True)
    if args.cv_only:
        path = attach_record(args.out, record, opts)
        print(f"figures recorded in {path}", flush=True)
        return
    path = fit_and_save(table, examples, opts, args.out, record=record, log=lambda m: print(m, flush=True))
    print(f"model written: {path} ({time.monotonic() - t0:.0f} s in all)", flush=True)


if __name__ == "__main__":
    main()
