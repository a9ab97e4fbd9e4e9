"""build_dataset: merging sources, duplicate files, linked split groups, relative paths."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from cxrscreen.data.build import build_dataset, parse_source_arg
from cxrscreen.data.manifest import manifest_root, read_manifest, resolve_image_paths, write_manifest
from cxrscreen.errors import CXRError
from cxrscreen.io.files import file_sha1


def _sources(tmp_path: Path, png: Callable[[Path, int], Path]) -> list[tuple[str, Path]]:
    """Three sources sharing pictures:

    - cohen collection: patient 1 has a.png and b.png; patient 2 has c.png;
    - a manifest folder: patient X has x1.png (same bytes as a.png) and x2.png;
    - a plain folder: d.png, and dup.png (same bytes as d.png: a duplicate within one source).
    """
    cohen = tmp_path / "cohen"
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        png(cohen / "images" / f"{name}.png", seed)
    pd.DataFrame(
        {
            "patientid": ["1", "1", "2"],
            "finding": ["COVID-19", "COVID-19", "No Finding"],
            "view": ["PA", "AP", "PA"],
            "modality": ["X-ray"] * 3,
            "folder": ["images"] * 3,
            "filename": ["a.png", "b.png", "c.png"],
        }
    ).to_csv(cohen / "metadata.csv", index=False)

    other = tmp_path / "other"
    png(other / "img" / "x2.png", 4)
    shutil.copyfile(cohen / "images" / "a.png", other / "img" / "x1.png")
    write_manifest(
        pd.DataFrame(
            {
                "image": ["img/x1.png", "img/x2.png"],
                "label": ["covid", "covid"],
                "source": ["other"] * 2,
                "patient_id": ["other:X"] * 2,
                "split_group": ["G1"] * 2,
                "note": ["n1", "n2"],
            }
        ),
        other,
    )
    plain = tmp_path / "plain"
    png(plain / "pneumonia" / "d.png", 5)
    shutil.copyfile(plain / "pneumonia" / "d.png", plain / "pneumonia" / "dup.png")
    return [("cohen", cohen), ("manifest", other), ("folder", plain)]


def test_build_duplicates_links_and_paths(tmp_path: Path, png: Callable[[Path, int], Path]) -> None:
    sources = _sources(tmp_path, png)
    out = tmp_path / "built"
    summary = build_dataset(sources, out)

    df = read_manifest(out)
    names = [Path(p).name for p in df["image"]]
    assert names == ["a.png", "b.png", "c.png", "x2.png", "d.png"]  # x1 and dup dropped, first copies kept
    assert summary["duplicates"] == [
        ["../cohen/images/a.png", "../other/img/x1.png"],
        ["../plain/pneumonia/d.png", "../plain/pneumonia/dup.png"],
    ]
    assert summary["n_duplicates"] == 2

    # Relative paths that resolve from the output folder; sha1 filled; images not copied.
    assert not any(Path(p).is_absolute() for p in df["image"])
    paths = resolve_image_paths(df, manifest_root(out))
    assert all(p.is_file() for p in paths)
    assert df["sha1"].tolist() == [file_sha1(p) for p in paths]
    assert sorted(p.name for p in out.iterdir()) == ["build_summary.json", "manifest.csv"]

    # Patient X shared a picture with cohen patient 1: both now one group. Patient 2 and d stay apart.
    group = dict(zip(names, df["split_group"], strict=True))
    assert group["a.png"] == group["b.png"] == group["x2.png"] == "cohen:1"
    assert group["c.png"] == "cohen:2"
    assert group["d.png"].startswith("img:")
    assert summary["n_split_groups"] == 3 and summary["n_groups_linked"] == 1

    assert summary["labels"] == {"covid": 3, "normal": 1, "pneumonia": 1}
    assert summary["by_source"] == {
        "cohen": {"covid": 2, "normal": 1, "pneumonia": 0},
        "other": {"covid": 1, "normal": 0, "pneumonia": 0},
        "plain": {"covid": 0, "normal": 0, "pneumonia": 1},
    }
    assert [i["duplicates_dropped"] for i in summary["inputs"]] == [0, 1, 1]
    assert df["note"].tolist() == [
        "",
        "",
        "",
        "n2",
        "",
    ]  # extra columns kept, empty where a source lacks them
    assert json.loads((out / "build_summary.json").read_text()) == summary


def test_build_clashing_group_names_stay_apart(tmp_path: Path, png: Callable[[Path, int], Path]) -> None:
    for i, name in enumerate(("m1", "m2")):
        png(tmp_path / name / "i.png", i)
        write_manifest(
            pd.DataFrame(
                {
                    "image": ["i.png"],
                    "label": ["normal"],
                    "source": [name],
                    "patient_id": [""],
                    "split_group": ["S1"],
                }
            ),
            tmp_path / name,
        )
    build_dataset([("manifest", tmp_path / "m1"), ("manifest", tmp_path / "m2")], tmp_path / "out")
    assert read_manifest(tmp_path / "out")["split_group"].tolist() == ["S1", "S1@2"]


def test_build_refuses_to_overwrite_its_input(tmp_path: Path, png: Callable[[Path, int], Path]) -> None:
    sources = _sources(tmp_path, png)
    with pytest.raises(CXRError, match="would be overwritten"):
        build_dataset(sources, tmp_path / "other")


def test_build_real_manifest_plus_cohen(cxr_dir: Path, real_manifest: pd.DataFrame, tmp_path: Path) -> None:
    # The Cohen csv points at the manifest's own Cohen files: all 414 are duplicates, nothing changes.
    summary = build_dataset(
        [
            parse_source_arg(f"manifest:{cxr_dir}"),
            parse_source_arg(f"cohen:{cxr_dir}/annotations/cohen_metadata.csv"),
        ],
        tmp_path / "out",
    )
    assert summary["n_images"] == 2989 and summary["n_duplicates"] == 414
    assert summary["labels"] == {"covid": 964, "normal": 1506, "pneumonia": 519}
    assert summary["n_split_groups"] == real_manifest["split_group"].nunique()
    built = read_manifest(tmp_path / "out")
    assert built["split_group"].tolist() == real_manifest["split_group"].tolist()
    assert built["sha1"].tolist() == real_manifest["sha1"].tolist()


def test_parse_source_arg() -> None:
    assert parse_source_arg("cohen:/a/b.csv") == ("cohen", Path("/a/b.csv"))
    assert parse_source_arg("folder:rel/dir") == ("folder", Path("rel/dir"))
    with pytest.raises(CXRError, match=r"unknown source kind 'kaggle'.*known: manifest, cohen, rsna, folder"):
        parse_source_arg("kaggle:/x")
    with pytest.raises(CXRError, match="not KIND:PATH"):
        parse_source_arg("/just/a/path")


def test_merge_of_cxr_and_siim_reproduces_the_committed_split(cxr_dir: Path, tmp_path: Path):
    """The documented merge (cxrscreen data build + split --protocol combine) gives the committed merged split:
    every cxr image in its cxr subset, every siim image in its siim subset, no split_group in two subsets."""
    from cxrscreen.data.splits import combine_splits, read_split

    siim = cxr_dir.parent / "siim"
    if not (siim / "manifest.csv").is_file():
        pytest.skip(f"siim data not found at {siim}")
    summary = build_dataset([("manifest", cxr_dir), ("manifest", siim)], tmp_path / "merged")
    assert summary["n_images"] == 2989 + 4666 and summary["by_source"]["siim"] == {
        "covid": 2956, "normal": 1710, "pneumonia": 0}
    merged = read_manifest(tmp_path / "merged")
    repo = Path(__file__).resolve().parents[2]
    cxr_split = read_split(repo / "configs/splits/cxr_grouped_seed0.csv")
    siim_split = read_split(repo / "configs/splits/siim_grouped_seed0.csv")
    split = combine_splits(merged, [(cxr_split, read_manifest(cxr_dir)), (siim_split, read_manifest(siim))])
    committed = read_split(repo / "configs/splits/merged_grouped_seed0.csv")
    # the committed split names images relative to data/merged (where the README builds the merge)
    where = {str((tmp_path / "merged" / i).resolve()): sub for i, sub in zip(split["image"], split["subset"],
                                                                              strict=True)}
    assert where == {str((repo / "data" / "merged" / i).resolve()): sub
                     for i, sub in zip(committed["image"], committed["subset"], strict=True)}
    by_sha = dict(zip(merged["sha1"], split["subset"], strict=True))
    cxr = read_manifest(cxr_dir)
    cxr_sub = dict(zip(cxr_split["image"], cxr_split["subset"], strict=True))
    assert all(by_sha[sha] == cxr_sub[image] for image, sha in zip(cxr["image"], cxr["sha1"], strict=True))
    assert split.merge(merged, on="image").groupby("split_group")["subset"].nunique().max() == 1
