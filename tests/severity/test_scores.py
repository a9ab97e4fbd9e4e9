"""The severity scores file: comment lines, ranges, matching to the manifest and its split_group."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxrscreen.errors import CXRError
from cxrscreen.severity.scores import load_severity_set, read_scores

HEADER = "## scores\n## mean of three raters\nimage,geographic_extent_mean,opacity_mean\n"


def _manifest(root: Path) -> None:
    pd.DataFrame({"image": ["images/a.jpg", "images/b.jpg", "images/c.jpg"], "label": ["covid"] * 3,
                  "source": ["cohen"] * 3, "patient_id": ["p1", "p1", "p2"],
                  "split_group": ["S1", "S1", "S2"]}).to_csv(root / "manifest.csv", index=False)


def test_reads_comment_lines_and_matches_groups(tmp_path: Path) -> None:
    _manifest(tmp_path)
    (tmp_path / "s.csv").write_text(HEADER + "images/c.jpg,6.0,4.0\nimages/a.jpg,2.7,2.0\n")
    s = load_severity_set(tmp_path, tmp_path / "s.csv")
    assert s.images == ["images/c.jpg", "images/a.jpg"]
    assert s.groups == ["S2", "S1"]
    np.testing.assert_allclose(s.targets, [[6.0, 4.0], [2.7, 2.0]])
    assert s.paths[0] == tmp_path / "images/c.jpg"


@pytest.mark.parametrize("row,match", [("images/a.jpg,9.0,1.0", "geographic_extent_mean"),
                                       ("images/a.jpg,1.0,-1", "opacity_mean"),
                                       ("images/a.jpg,x,1.0", "not a number")])
def test_out_of_range_scores_are_refused(tmp_path: Path, row: str, match: str) -> None:
    (tmp_path / "s.csv").write_text(HEADER + row + "\n")
    with pytest.raises(CXRError, match=match):
        read_scores(tmp_path / "s.csv")


def test_scored_image_missing_from_manifest_is_refused(tmp_path: Path) -> None:
    _manifest(tmp_path)
    (tmp_path / "s.csv").write_text(HEADER + "images/zzz.jpg,1,1\n")
    with pytest.raises(CXRError, match="not in the manifest"):
        load_severity_set(tmp_path, tmp_path / "s.csv")


def test_real_scores(data_dir: Path) -> None:
    s = load_severity_set(data_dir)
    assert len(s) == 88 and len(set(s.groups)) == 62
    assert s.targets[:, 0].max() <= 8 and s.targets[:, 1].max() <= 6
