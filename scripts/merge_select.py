"""One selection table out of several `cxrscreen select` results (and `scripts/ensemble_select.py`'s rows).

Every candidate ever measured sits in one table with its score; the files must share data, splits and resamples.

    python scripts/merge_select.py docs/results/select/select.json docs/results/select_more/select.json \
        docs/results/select_more/ensemble.json --out docs/results/select_all
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cxrscreen.errors import CXRError
from cxrscreen.io.files import write_json
from cxrscreen.training.select import merge_results, select_markdown


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", type=Path, help="select.json files")
    ap.add_argument("--out", type=Path, required=True, help="folder for select.json and select.md")
    args = ap.parse_args(argv)
    loaded = []
    for path in args.results:
        try:
            loaded.append(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            raise CXRError(f"cannot read the selection result ({exc})", path) from exc
    merged = merge_results(loaded, [str(p) for p in args.results])
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "select.json", merged)
    (args.out / "select.md").write_text(select_markdown(merged))
    print(json.dumps({"best": merged["best"], "candidates": len(merged["candidates"]), "out": str(args.out)}))


if __name__ == "__main__":
    main()
