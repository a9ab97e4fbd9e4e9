"""The result seam: one typed result, one CSV schema for the CLI and batch screening, JSONL and text."""

from __future__ import annotations

import csv
import io
import json

from cxrscreen.predict.batch import ResultWriter
from cxrscreen.results.result import PredictionResult
from cxrscreen.results.writers import CsvWriter, JsonlWriter, TextWriter, csv_columns

CLASSES = ["covid", "normal", "pneumonia"]
OK = {"path": "a.png", "class": "covid", "probabilities": {"covid": 0.6, "normal": 0.3, "pneumonia": 0.1},
      "decision": {"rule": "argmax"}, "error": None, "flags": []}
FLAGGED = {"path": "=cmd|x.png", "class": None, "probabilities": None, "error": None, "flags": ["blank image"]}
FAILED = {"path": "bad\n.png", "class": None, "probabilities": None, "error": "empty file (0 bytes)", "flags": []}


def _rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_dict_round_trip_keeps_the_json_shape() -> None:
    for res in (OK, FLAGGED, FAILED, {**OK, "boxes": [], "severity": None}):
        assert PredictionResult.from_dict(res).to_dict() == res


def test_cli_and_batch_csv_share_one_schema(tmp_path) -> None:
    buf = io.StringIO()
    w = CsvWriter(CLASSES, buf)
    w.open()
    w.write([PredictionResult.from_dict(r) for r in (OK, FLAGGED, FAILED)])
    w.close()
    batch = ResultWriter(tmp_path / "out.csv", CLASSES)
    batch.write([OK, FLAGGED, FAILED])
    batch.close()
    assert buf.getvalue() == (tmp_path / "out.csv").read_text(encoding="utf-8")
    rows = _rows(buf.getvalue())
    assert list(rows[0]) == csv_columns(CLASSES)
    assert float(rows[0]["p_covid"]) == 0.6 and rows[0]["class"] == "covid"
    assert rows[1]["path"] == "'=cmd|x.png" and rows[1]["p_covid"] == "" and rows[1]["flags"] == "blank image"
    assert rows[2]["path"] == "bad\\n.png" and rows[2]["error"] == "empty file (0 bytes)"


def test_jsonl_and_text() -> None:
    buf = io.StringIO()
    w = JsonlWriter(buf)
    w.open()
    w.write([PredictionResult.from_dict(r) for r in (OK, FLAGGED)])
    assert [json.loads(x) for x in buf.getvalue().splitlines()] == [OK, FLAGGED]
    lines: list[str] = []
    t = TextWriter(lines.append)
    t.write([PredictionResult.from_dict(r) for r in (OK, FLAGGED, FAILED)])
    assert lines == ["a.png: covid  covid 60.0 %, normal 30.0 %, pneumonia 10.0 %",
                     "=cmd|x.png: no diagnosis (blank image)"]


def test_withhold_and_failed_give_the_rows_every_writer_showed() -> None:
    boxes = [{"box": [0, 0, 5, 5], "label": 1, "class": "covid", "score": 0.9}]
    res = PredictionResult.from_dict({**OK, "boxes": boxes}).withhold(["blank image"])
    assert res.withheld and res.label is None and res.probabilities is None and res.extra == {"boxes": []}
    assert res.to_dict() == {**FLAGGED, "path": "a.png", "decision": {"rule": "argmax"}, "boxes": []}
    assert PredictionResult.from_dict(OK).withhold([]).to_dict() == OK  # no flag: nothing withheld
    assert PredictionResult.failed("bad\n.png", "empty file (0 bytes)").to_dict() == FAILED
