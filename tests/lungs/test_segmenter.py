"""The lung segmenter: loading (sha256 checked), masks at the input's size with right and left in place, the
`segment` command, the ONNX export."""

from __future__ import annotations

import gc
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cxrscreen.cli import app
from cxrscreen.errors import CXRError
from cxrscreen.io.files import file_sha256
from cxrscreen.lungs import segmenter
from cxrscreen.lungs.masks import LEFT, RIGHT, dice_iou, lung_fractions, mask_to_model
from cxrscreen.lungs.segmenter import (
    CONFIG_FILE,
    DEFAULT_PREPROCESS,
    WEIGHTS_FILE,
    LungSegmenter,
    arch_record,
    build_unet,
    bundled_dir,
)
from cxrscreen.transforms.ops import SquarePreprocessor
from tests.conftest import synthetic_cxr

pytestmark = pytest.mark.usefixtures("one_thread")


def synthetic_lungs(h: int, w: int) -> np.ndarray:
    """The label map of `synthetic_cxr`'s two dark ellipses: the one on the image's left is the right lung."""
    yy, xx = np.mgrid[0:h, 0:w]
    out = np.zeros((h, w), np.uint8)
    for cx, k in ((0.3 * w, RIGHT), (0.7 * w, LEFT)):
        out[((xx - cx) / (0.17 * w)) ** 2 + ((yy - 0.5 * h) / (0.32 * h)) ** 2 < 1] = k
    return out


@pytest.fixture(scope="module")
def random_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model folder with an untrained U-Net (fast; for loading, export and CLI plumbing)."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("lungs")
    model = build_unet()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / WEIGHTS_FILE))
    cfg = {"arch": arch_record(), "preprocess": DEFAULT_PREPROCESS.to_dict(),
           "weights_sha256": file_sha256(folder / WEIGHTS_FILE)}
    (folder / CONFIG_FILE).write_text(json.dumps(cfg))
    return folder


def test_bundled_model_is_small_and_records_its_figures() -> None:
    cfg = json.loads((bundled_dir() / CONFIG_FILE).read_text())
    assert (bundled_dir() / WEIGHTS_FILE).stat().st_size < 10_000_000
    assert cfg["weights_sha256"] == file_sha256(bundled_dir() / WEIGHTS_FILE)
    assert cfg["cv"]["grouped_by"] == "split_group" and cfg["cv"]["cv"]["dice_right"]["mean"] > 0.85
    assert {"seed", "training", "versions", "arch", "preprocess"} <= set(cfg)


def test_bundled_model_finds_synthetic_lungs_on_the_right_sides() -> None:
    h, w = 300, 260
    mask = LungSegmenter.load().segment(synthetic_cxr(h, w)).mask
    assert mask.shape == (h, w) and set(np.unique(mask)) <= {0, RIGHT, LEFT}
    truth = synthetic_lungs(h, w)
    for k in (RIGHT, LEFT):
        assert dice_iou(mask == k, truth == k)[0] > 0.8
    # the patient's right lung is on the image's left: never swapped
    assert np.nonzero(mask == RIGHT)[1].mean() < w / 2 < np.nonzero(mask == LEFT)[1].mean()


def test_changed_weights_are_refused(random_folder: Path, tmp_path: Path) -> None:
    folder = tmp_path / "m"
    shutil.copytree(random_folder, folder)
    with open(folder / WEIGHTS_FILE, "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(CXRError, match="checksum mismatch"):
        LungSegmenter.load(folder)
    with pytest.raises(CXRError, match="no lung segmentation model"):
        LungSegmenter.load(tmp_path)


def test_masks_come_back_at_the_input_size(random_folder: Path) -> None:
    seg = LungSegmenter.load(random_folder)
    for h, w in ((97, 211), (256, 128)):
        res = seg.segment(synthetic_cxr(h, w))
        assert res.mask.shape == (h, w) and res.mask.dtype == np.uint8


def test_segment_command_mirrors_folders_and_reports_bad_files(random_folder: Path, tmp_path: Path) -> None:
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    cv2.imwrite(str(src / "sub" / "a.png"), (synthetic_cxr(120, 100) * 255).astype(np.uint8))
    (src / "bad.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["segment", str(src), "--out", str(out), "--model", str(random_folder), "--json",
                                 "--overlay"])
    assert r.exit_code == 1
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    good = next(x for x in rows if x["error"] is None)
    assert Path(good["mask"]) == out / "in" / "sub" / "a_lungs.png"
    m = cv2.imread(good["mask"], cv2.IMREAD_UNCHANGED)
    assert m.shape == (120, 100) and m.max() <= 2
    assert Path(good["overlay"]).is_file()
    bad = next(x for x in rows if x["error"])
    assert bad["path"].endswith("bad.png") and "bad.png" in r.stderr


def test_onnx_export_gives_the_same_masks(random_folder: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from cxrscreen.lungs.export import export_lungs_onnx, load_lungs_onnx

    seg = LungSegmenter.load(random_folder)
    info = export_lungs_onnx(seg, tmp_path / "lungs.onnx")
    assert info["max_abs_diff_logits"] < 1e-3
    img = synthetic_cxr(150, 170)
    onnx_seg = load_lungs_onnx(tmp_path / "lungs.onnx")
    assert (onnx_seg.segment(img).mask == seg.segment(img).mask).mean() > 0.999
    with pytest.raises(CXRError, match="not found"):
        load_lungs_onnx(tmp_path / "none.onnx")


class CountingModel:
    """Wraps a network, counting the images it is run on."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.images = model, 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.images += len(x)
        return self.model(x)


def test_an_xray_is_segmented_once_however_many_parts_ask(random_folder: Path) -> None:
    seg = LungSegmenter.load(random_folder)
    seg.model = counting = CountingModel(seg.model)
    a, b = synthetic_cxr(120, 100), synthetic_cxr(90, 140)
    first = seg.segment(a)  # e.g. the gate's lungs rule
    assert seg.segment(a) is first  # then the severity zones, the heat map's share: not segmented again
    assert seg.segment_many([b, a])[1] is first
    assert counting.images == 2
    assert seg.segment(a.copy()) is not first and counting.images == 3  # another array is segmented
    del a, b
    gc.collect()
    assert not seg._memo  # forgotten with the arrays


def test_lung_sizes_come_from_the_network_grid_without_the_full_size_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    h, w = 3000, 2000  # a full-size film: its lungs' sizes must not cost work at this resolution
    prep = SquarePreprocessor(DEFAULT_PREPROCESS)
    _, geom = prep(np.zeros((h, w), np.float32))
    truth = synthetic_lungs(h, w)
    probs = np.eye(3, dtype=np.float32)[mask_to_model(truth, geom)].transpose(2, 0, 1)
    monkeypatch.setattr(segmenter, "full_size_labels", lambda p, g: pytest.fail("full-size mask computed"))
    res = segmenter.LungResult(probs=probs, geometry=geom)
    assert res.grid.shape[1] < res.grid.shape[0] == 128  # the padding cut off
    for lung, frac in lung_fractions(truth).items():
        assert abs(res.fractions[lung] - frac) < 0.003
    monkeypatch.undo()
    full = res.mask
    assert full.shape == (h, w) and dice_iou(full == RIGHT, truth == RIGHT)[0] > 0.97
    assert res.mask is full  # computed once


def test_a_segmenter_that_has_seen_many_images_runs_a_frozen_graph_with_the_same_masks() -> None:
    frozen_seg, eager_seg = segmenter.LungSegmenter.load(), segmenter.LungSegmenter.load()
    images = [synthetic_cxr(160, 150, seed=i) for i in range(segmenter.FREEZE_AFTER_IMAGES)]
    frozen_seg.segment_many(images)
    assert frozen_seg._graph is not None and eager_seg._graph is None
    later = [synthetic_cxr(170, 160, seed=100 + i) for i in range(3)]
    fast, slow = frozen_seg.segment_many(later), eager_seg.segment_many([im.copy() for im in later])
    for a, b in zip(fast, slow, strict=True):
        assert np.abs(a.probs - b.probs).max() < 1e-3
        assert all(abs(a.fractions[k] - b.fractions[k]) < 1e-3 for k in a.fractions)
