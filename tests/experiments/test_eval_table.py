"""scripts/eval_table.py prints the figures stored in eval JSON files, intervals included."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location("eval_table", REPO / "scripts" / "eval_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _ev(n: int, acc: float, sens: float | None) -> dict:
    v = {"value": sens, "ci95": None if sens is None else [sens - 0.1, sens + 0.05]}
    return {"n": n, "accuracy": acc, "macro_f1": acc / 2,
            "covid_vs_rest": {"sensitivity": v, "specificity": {"value": 0.9, "ci95": [0.8, 0.95]},
                              "auc": {"value": None}}}


def test_table_rows_and_per_source(tmp_path: Path, capsys) -> None:
    path = tmp_path / "eval.json"
    path.write_text(json.dumps({**_ev(10, 0.5, 0.75), "per_source": {"rsna": _ev(4, 0.25, None)}}))
    _load().main([str(path), "--per-source"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == f"| {path} | 10 | 0.500 | 0.250 | 0.750 [0.650, 0.800] | 0.900 [0.800, 0.950] | n/a |"
    assert lines[3].startswith("|   rsna | 4 | 0.250 | 0.125 | n/a |")


def test_unreadable_file_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(SystemExit, match="bad.json: not a readable eval JSON"):
        _load().main([str(bad)])
