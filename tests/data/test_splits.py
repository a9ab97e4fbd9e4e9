"""Splits on the real manifest (grouped, paper, source) and split files."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from cxrscreen.data.splits import (
    PAPER_COUNTS,
    SUBSETS,
    join_split,
    read_split,
    split_grouped,
    split_paper,
    split_source,
    write_split,
)
from cxrscreen.errors import CXRError


def _joined(manifest: pd.DataFrame, split: pd.DataFrame) -> pd.DataFrame:
    assert list(split.columns) == ["image", "subset"]
    assert set(split["subset"]) <= set(SUBSETS)
    # Manifest order kept.
    order = manifest["image"][manifest["image"].isin(split["image"])].tolist()
    assert split["image"].tolist() == order
    out = join_split(manifest, split)
    # No split group in two subsets.
    assert out.groupby("split_group")["subset"].nunique().max() == 1
    return out


def _table(df: pd.DataFrame) -> dict[tuple[str, str], int]:
    return {k: int(v) for k, v in df.groupby(["label", "subset"]).size().items()}


def test_grouped_proportions_and_determinism(real_manifest: pd.DataFrame) -> None:
    split = split_grouped(real_manifest, seed=0)
    assert len(split) == len(real_manifest)
    out = _joined(real_manifest, split)
    for label, part in out.groupby("label"):
        share = part["subset"].value_counts(normalize=True)
        assert share["test"] == pytest.approx(0.2, abs=0.01), label
        assert share["val"] == pytest.approx(0.08, abs=0.01), label
    assert split.equals(split_grouped(real_manifest, seed=0))
    other = split_grouped(real_manifest, seed=1)
    assert (other["subset"] != split["subset"]).sum() > 100


def test_paper_counts(real_manifest: pd.DataFrame) -> None:
    split, messages = split_paper(real_manifest, seed=0)
    counts = _table(_joined(real_manifest, split))
    for label in ("covid", "normal"):
        for subset in ("train", "test"):
            assert counts[(label, subset)] == PAPER_COUNTS[subset][label], (label, subset)
    assert counts[("covid", "val")] == 10 and counts[("normal", "val")] == 21
    # Pneumonia: 519 images < 204 + 20 + 443. Train gets its 204, val its 20, test the 295 left.
    assert counts[("pneumonia", "train")] == 204
    assert counts[("pneumonia", "val")] == 20
    assert counts[("pneumonia", "test")] == 295
    assert messages == [
        "pneumonia: test has 295 images, the protocol asks for 443 (the class has 519 images; "
        "train and val are filled first)"
    ]
    again, _ = split_paper(real_manifest, seed=0)
    assert again.equals(split)
    other, _ = split_paper(real_manifest, seed=1)
    assert set(other["image"]) != set(split["image"])


def test_paper_exact_with_groups_that_overshoot() -> None:
    # Groups of 5, 3, 1, 1 images: 4 train images need skipping the 5 (and a 3 + 1 pick).
    rows = [("g5", 5), ("g3", 3), ("ga", 1), ("gb", 1), ("t1", 2), ("t2", 2)]
    df = pd.DataFrame(
        [(f"{g}-{i}.png", "normal", g) for g, n in rows for i in range(n)],
        columns=["image", "label", "split_group"],
    )
    counts = {"train": {"normal": 4}, "test": {"normal": 4}}
    for seed in range(5):
        split, messages = split_paper(df, seed=seed, val_frac=0.0, counts=counts)
        out = _joined(df, split)
        assert out["subset"].value_counts().to_dict() == {"train": 4, "test": 4}
        assert messages == []


def test_paper_train_exact_when_a_class_is_short() -> None:
    # 30 "pneumonia" images in groups of 1-3 against train 20 + val 2 + test 20: train and val are exact,
    # test takes the 8 left and says so; "normal" has enough and meets every count.
    sizes = [3, 1, 2, 1, 3, 2, 1, 1, 2, 3, 1, 2, 1, 3, 2, 1, 1]  # 30 images
    rows = [(f"p{g}-{i}.png", "pneumonia", f"p{g}") for g, n in enumerate(sizes) for i in range(n)]
    rows += [(f"n{k}.png", "normal", f"n{k}") for k in range(60)]
    df = pd.DataFrame(rows, columns=["image", "label", "split_group"])
    counts = {"train": {"pneumonia": 20, "normal": 20}, "test": {"pneumonia": 20, "normal": 20}}
    for seed in range(5):
        split, messages = split_paper(df, seed=seed, val_frac=0.1, counts=counts)
        table = _table(_joined(df, split))
        assert table[("pneumonia", "train")] == 20 and table[("normal", "train")] == 20
        assert table[("pneumonia", "val")] == 2 and table[("normal", "val")] == 2
        assert table[("pneumonia", "test")] == 8 and table[("normal", "test")] == 20
        assert messages == [
            "pneumonia: test has 8 images, the protocol asks for 20 (the class has 30 images; "
            "train and val are filled first)"
        ]


def test_source_holdout(real_manifest: pd.DataFrame) -> None:
    split = split_source(real_manifest, holdout_source="cohen", seed=0)
    out = _joined(real_manifest, split)
    assert len(out) == len(real_manifest)
    assert (out.loc[out["source"] == "cohen", "subset"] == "test").all()
    # Only groups holding a Cohen image join the test set (3 covid-cxnet images share a group with Cohen).
    test_groups = set(out.loc[out["subset"] == "test", "split_group"])
    assert test_groups == set(out.loc[out["source"] == "cohen", "split_group"])
    assert (out["subset"] == "test").sum() == 417
    rest = out[out["subset"] != "test"]
    assert rest["subset"].value_counts(normalize=True)["val"] == pytest.approx(0.1, abs=0.01)
    assert split.equals(split_source(real_manifest, holdout_source="cohen", seed=0))
    assert not split.equals(split_source(real_manifest, holdout_source="cohen", seed=1))
    with pytest.raises(CXRError, match=r"unknown source 'kaggle' \(known: cohen, covid-cxnet, nih, rsna\)"):
        split_source(real_manifest, holdout_source="kaggle", seed=0)


def test_split_files(tmp_path: Path) -> None:
    split = pd.DataFrame({"image": ["a.png", "b.png", "c.png"], "subset": ["train", "val", "test"]})
    path = write_split(split, tmp_path / "splits" / "split.csv")
    assert read_split(path).equals(split)
    split.assign(subset=["train", "dev", "test"]).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(CXRError, match=r"bad subset 'dev' in row 2") as err:
        read_split(tmp_path / "bad.csv")
    assert err.value.path == str(tmp_path / "bad.csv")
    split[["image"]].to_csv(tmp_path / "nosubset.csv", index=False)
    with pytest.raises(CXRError, match="missing column 'subset'"):
        read_split(tmp_path / "nosubset.csv")
    with pytest.raises(CXRError, match="listed twice"):
        write_split(pd.concat([split, split]), tmp_path / "dup.csv")


def test_combine_keeps_each_source_split_by_content():

    from cxrscreen.data.splits import combine_splits

    a = pd.DataFrame({"image": ["x/1.jpg", "x/2.jpg"], "sha1": ["h1", "h2"]})
    b = pd.DataFrame({"image": ["y/3.jpg"], "sha1": ["h3"]})
    merged = pd.DataFrame({"image": ["../a/x/1.jpg", "../a/x/2.jpg", "../b/y/3.jpg"], "sha1": ["h1", "h2", "h3"],
                           "split_group": ["g1", "g2", "g3"]})
    parts = [(pd.DataFrame({"image": ["x/1.jpg", "x/2.jpg"], "subset": ["test", "train"]}), a),
             (pd.DataFrame({"image": ["y/3.jpg"], "subset": ["val"]}), b)]
    out = combine_splits(merged, parts)
    assert list(out["image"]) == list(merged["image"]) and list(out["subset"]) == ["test", "train", "val"]
    with pytest.raises(CXRError, match="none of the splits"):
        combine_splits(merged, parts[:1])
    linked = merged.assign(split_group=["g1", "g1", "g3"])
    with pytest.raises(CXRError, match="two subsets"):
        combine_splits(linked, parts)
