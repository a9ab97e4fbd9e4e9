"""Print a markdown table of eval JSON files (from `cxrscreen evaluate --out`), one row per file.

    python scripts/eval_table.py docs/results/ssd300/*/eval_test.json [--per-source]

Columns: n, accuracy, macro-F1, COVID sensitivity / specificity / AUC with their 95 % intervals (bootstrap
over split_group, as stored in the JSON). The numbers are read, never computed here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cxrscreen.evaluation.formatting import format_ci


def rows_for(path: Path, per_source: bool) -> list[list[str]]:
    """The table rows of one eval JSON: the whole subset, then (optionally) each source."""
    try:
        ev = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SystemExit(f"{path}: not a readable eval JSON ({exc})") from exc
    scopes = [("all", ev)] + (sorted(ev.get("per_source", {}).items()) if per_source else [])
    out = []
    for name, r in scopes:
        c = r["covid_vs_rest"]
        out.append([str(path) if name == "all" else f"  {name}", str(r["n"]), f"{r['accuracy']:.3f}",
                    f"{r['macro_f1']:.3f}", *(format_ci(c[k]) for k in ("sensitivity", "specificity", "auc"))])
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("evals", nargs="+", type=Path)
    ap.add_argument("--per-source", action="store_true", help="a row per source under each file")
    args = ap.parse_args(argv)
    head = ["eval", "n", "accuracy", "macro-F1", "COVID sensitivity", "COVID specificity", "COVID AUC"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in args.evals:
        lines += ["| " + " | ".join(r) + " |" for r in rows_for(p, args.per_source)]
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
