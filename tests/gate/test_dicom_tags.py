"""The gate's DICOM rules against tags it ignored (issue 21 item 11): BodyPartExamined naming another part
and a multi-valued ViewPosition (one image claiming two views)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cxrscreen.gate.features import rule_flags
from cxrscreen.io.xray import read_xray
from cxrscreen.synthetic import write_dicom
from tests.conftest import synthetic_cxr


def _dicom(path: Path, **tags: object) -> Path:
    return write_dicom(path, (synthetic_cxr(256, 256) * 4095).astype(np.uint16), bits_stored=12, Modality="DX",
                       **tags)


@pytest.mark.parametrize("part", ["HEAD", "SKULL", "KNEE", "L SPINE PELVIS"])
def test_non_chest_body_part_is_flagged(tmp_path: Path, part: str) -> None:
    x = read_xray(_dicom(tmp_path / "a.dcm", BodyPartExamined=part, ViewPosition="PA"))
    assert x.meta["body_part"] == part
    assert any(f"BodyPartExamined is {part}" in f for f in rule_flags(x)), rule_flags(x)


@pytest.mark.parametrize("part", ["CHEST", "THORAX", "PECHO", "CHEST_PA", "CHEST SPINE"])
def test_chest_body_parts_are_not_flagged(tmp_path: Path, part: str) -> None:
    x = read_xray(_dicom(tmp_path / "a.dcm", BodyPartExamined=part, ViewPosition="PA"))
    assert not [f for f in rule_flags(x) if "BodyPartExamined" in f or "view" in f]


def test_multi_valued_view_position_is_flagged(tmp_path: Path) -> None:
    """`PA\\LL` was read as the text "['PA', 'LL']" and passed."""
    x = read_xray(_dicom(tmp_path / "a.dcm", ViewPosition=["PA", "LL"]))
    assert x.meta["view_position"] == "PA\\LL"
    assert any("several values (PA\\LL)" in f for f in rule_flags(x)), rule_flags(x)
    single = read_xray(_dicom(tmp_path / "b.dcm", ViewPosition="AP"))
    assert not [f for f in rule_flags(single) if "view" in f]
