"""The "ensemble of a fine-tuned model with the frozen one" candidate of `cxrscreen select` (issue 20).

Rows for a fine-tuned run directory alone and for the mean of its probabilities with those of one candidate of a
selection YAML (its head refitted with the penalty its select run chose), on the cxr and siim grouped tests and the
external set (`cxrscreen.training.select.evaluate_ensemble`). No leave-one-source-out (it would need the fine-tuned
model retrained without each source). Writes a select-shaped JSON and markdown that `scripts/merge_select.py` merges.

    python scripts/ensemble_select.py --config configs/select.yaml --candidate lite0_224_blocks2-6_merged \
        --c 0.003 --finetuned /tmp/v2_model --out docs/results/select_ensemble
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cxrscreen.errors import CXRError
from cxrscreen.io.files import write_json
from cxrscreen.training.select import SelectConfig, evaluate_ensemble, select_markdown, summarise


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, required=True, help="selection YAML")
    ap.add_argument("--candidate", required=True, help="the frozen candidate of the YAML to average with")
    ap.add_argument("--c", type=float, required=True, help="its head's penalty (the C its select run chose)")
    ap.add_argument("--finetuned", type=Path, required=True, help="run directory of the fine-tuned model")
    ap.add_argument("--out", type=Path, required=True, help="folder for select.json and select.md")
    args = ap.parse_args(argv)
    cfg = SelectConfig.from_yaml(args.config)
    cand = next((c for c in cfg.candidates if c.name == args.candidate), None)
    if cand is None:
        raise CXRError(f"no candidate is named {args.candidate}", args.config)
    result = summarise(cfg, evaluate_ensemble(cand, cfg, args.finetuned, args.c))
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "select.json", result)
    (args.out / "select.md").write_text(select_markdown(result))
    print(json.dumps({c["name"]: c["external"]["covid_vs_rest"]["auc"]["value"] for c in result["candidates"]}))


if __name__ == "__main__":
    main()
