"""Lung U-Net training: grouped folds, targets moved as the image is, augmentation never swapping the lungs."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxrscreen.lungs import training
from cxrscreen.lungs.masks import LEFT, RIGHT
from cxrscreen.lungs.segmenter import DEFAULT_PREPROCESS
from cxrscreen.transforms.preprocess import Preprocessor
from tests.lungs.test_masks import two_lungs


def fake_table(n: int = 24) -> tuple[pd.DataFrame, list[training.Example]]:
    groups = [f"g{i // 3}" for i in range(n)]  # three images per split group
    rows = pd.DataFrame({"image": [f"i{i}.png" for i in range(n)], "mask": [f"m{i}.png" for i in range(n)],
                         "split_group": groups, "source": ["v7"] * (n - 6) + ["generalblockchain"] * 6,
                         "set": "cxr"})
    les = pd.DataFrame({"image": ["l0.png", "l1.png"], "mask": ["lm0.png", "lm1.png"],
                        "split_group": ["g0", "gb:x"], "source": "generalblockchain", "set": "lesions"})
    table = pd.concat([rows, les], ignore_index=True)
    m = two_lungs(64, 64)
    ex = [training.Example(np.zeros((128, 128), np.uint8), np.zeros((128, 128), np.uint8), m,
                           np.zeros((64, 64), np.float32)) for _ in range(len(table))]
    for i, e in enumerate(ex):
        e.image[0, 0] = i  # which row an example came from
    return table, ex


def test_cv_is_grouped_and_lesions_duplicates_stay_out_of_training(monkeypatch: pytest.MonkeyPatch) -> None:
    table, ex = fake_table()
    trained: list[set[int]] = []
    tested: list[set[int]] = []

    def fake_train(examples, opts, log=print):  # noqa: ANN001, ANN202
        trained.append({int(e.image[0, 0]) for e in examples})
        return object()

    def fake_score(seg, examples):  # noqa: ANN001, ANN202
        tested.append({int(e.image[0, 0]) for e in examples})
        return [training.mask_scores(e.truth, e.truth) for e in examples]

    monkeypatch.setattr(training, "train_model", fake_train)
    monkeypatch.setattr(training, "segmenter_of", lambda model, opts=None: model)
    monkeypatch.setattr(training, "score_examples", fake_score)
    res = training.cross_validate(table, ex, training.TrainOptions(), k=2, log=lambda m: None)
    groups = table["split_group"].to_numpy()
    assert len(trained) == 2
    for f, train_rows in enumerate(trained):
        test_rows = tested[2 * f] | tested[2 * f + 1]  # the fold's cxr rows, then its lesions rows
        assert not {groups[i] for i in train_rows} & {groups[i] for i in test_rows}
        assert all(table["set"].iloc[i] == "cxr" for i in train_rows)
    cxr_tested = tested[0] | tested[2]
    assert cxr_tested == set(range(24))  # every cxr image tested once
    assert res["figures"]["cv"]["n"] == 24 and res["figures"]["lesions"]["n"] == 2
    assert res["figures"]["cv"]["dice_right"]["mean"] == 1.0


def test_cross_source_trains_on_v7_only_and_tests_the_other_source(monkeypatch: pytest.MonkeyPatch) -> None:
    table, ex = fake_table()
    seen: dict[str, set[int]] = {}
    monkeypatch.setattr(training, "train_model",
                        lambda examples, opts, log=print: seen.setdefault("train", {int(e.image[0, 0])
                                                                                    for e in examples}))
    monkeypatch.setattr(training, "segmenter_of", lambda model, opts=None: model)

    def fake_score(seg, examples):  # noqa: ANN001, ANN202
        seen["test"] = {int(e.image[0, 0]) for e in examples}
        return [training.mask_scores(e.truth, e.truth) for e in examples]

    monkeypatch.setattr(training, "score_examples", fake_score)
    res = training.cross_source(table, ex, training.TrainOptions(), log=lambda m: None)
    groups = table["split_group"].to_numpy()
    assert all(table["source"].iloc[i] == "v7" for i in seen["train"])
    assert all(table["source"].iloc[i] == "generalblockchain" for i in seen["test"])
    assert not {groups[i] for i in seen["train"]} & {groups[i] for i in seen["test"]}
    assert res["figures"]["n"] == 8


def test_mask_moves_with_the_image() -> None:
    m = two_lungs(150, 260)
    img = np.where(m > 0, 0.2, 0.8).astype(np.float32)
    small, geom = Preprocessor(DEFAULT_PREPROCESS)(img)
    target = training.mask_to_model(m, geom)
    assert target.shape == (128, 128)
    assert (small[target > 0] < 128).mean() > 0.97  # the lungs land on the dark pixels
    assert (target[small >= 128] == 0).mean() > 0.97  # the body on the background


def test_augmentation_never_swaps_the_lungs() -> None:
    rng = np.random.default_rng(0)
    m = training.mask_to_model(two_lungs(128, 128), Preprocessor(DEFAULT_PREPROCESS)(np.zeros((128, 128),
                                                                                             np.float32))[1])
    img = np.where(m > 0, 50, 200).astype(np.uint8)
    for _ in range(30):
        a, t = training.augment(img, m, rng)
        xs_r, xs_l = np.nonzero(t == RIGHT)[1], np.nonzero(t == LEFT)[1]
        assert xs_r.mean() < xs_l.mean()
        assert (a[t > 0] < 128).mean() > 0.95 and (t[a >= 128] == 0).mean() > 0.95


def test_atlas_label_map_puts_the_right_lung_on_the_image_left() -> None:
    a = training.atlas_label_map((100, 200))
    assert np.nonzero(a == RIGHT)[1].max() < np.nonzero(a == LEFT)[1].min()


def test_summary_ci_brackets_the_mean() -> None:
    rows = [{"dice_right": v} for v in np.linspace(0.8, 1.0, 20)]
    s = training.summarise(rows, [f"g{i // 2}" for i in range(20)])
    lo, hi = s["dice_right"]["ci95"]
    assert lo <= s["dice_right"]["mean"] <= hi and s["n"] == 20


def test_input_side_and_decoder_are_options_recorded_with_the_model(tmp_path: Path) -> None:
    opts = training.TrainOptions(image_size=96, decoder_channels=(48, 24, 12, 8, 8))
    seg = training.segmenter_of(training.build_unet(opts.arch), opts)
    assert seg.preprocess.image_size == 96 and seg.config["arch"]["decoder_channels"] == [48, 24, 12, 8, 8]
    assert seg.probabilities(np.zeros((1, 96, 96), np.uint8)).shape == (1, 3, 96, 96)
    # a lungs.json written before these were options records them in "preprocess" and "arch" only
    old = {k: v for k, v in asdict(training.TrainOptions()).items() if k not in ("image_size", "decoder_channels")}
    (tmp_path / "lungs.json").write_text(json.dumps({"training": old, "arch": training.arch_record(),
                                                     "preprocess": training.DEFAULT_PREPROCESS.to_dict()}))
    training.attach_record(tmp_path, {"cv": {"n": 1}}, training.TrainOptions())
    with pytest.raises(ValueError, match="was fitted with"):
        training.attach_record(tmp_path, {"cv": {"n": 1}}, opts)
