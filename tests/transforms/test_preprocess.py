import numpy as np
import pytest
import torch

from cxrscreen.transforms.augment import eval_transform, train_transform
from cxrscreen.transforms.preprocess import ApplyCLAHE, PreprocessConfig, Preprocessor
from tests.conftest import synthetic_cxr


def test_clahe_on_changes_contrast_off_keeps_it():
    img = (synthetic_cxr(128, 128) * 0.3 + 0.35).astype(np.float32)  # low-contrast input
    on, _ = Preprocessor(PreprocessConfig(image_size=64, clahe=True))(img)
    off, _ = Preprocessor(PreprocessConfig(image_size=64, clahe=False))(img)
    assert on.dtype == off.dtype == np.uint8 and on.shape == off.shape == (64, 64)
    assert on.std() > off.std() * 1.2  # CLAHE stretches local contrast
    assert not np.array_equal(on, off)


def test_clahe_needs_uint8():
    with pytest.raises(TypeError):
        ApplyCLAHE()(np.zeros((8, 8), np.float32))


def test_crop_keeps_aspect_and_takes_centre():
    img = np.zeros((100, 200), np.float32)
    img[:, 50:150] = 1.0  # the centred square is all white, the sides black
    out, geom = Preprocessor(PreprocessConfig(image_size=50, clahe=False))(img)
    assert out.min() == 255  # no bars: the crop never includes the black sides
    assert geom.box == (50, 0, 150, 100)


def test_pad_mode_pads_and_maps_back():
    img = np.ones((100, 200), np.float32)
    out, geom = Preprocessor(PreprocessConfig(image_size=50, clahe=False, resize_mode="pad"))(img)
    assert out[0, 25] == 0 and out[25, 25] == 255  # bars above and below
    heat = np.zeros((50, 50), np.float32)
    heat[20:30, 20:30] = 1
    back = geom.to_original(heat)
    assert back.shape == (100, 200)
    ys, xs = np.nonzero(back > 0.5)
    assert abs(xs.mean() - 100) < 3 and abs(ys.mean() - 50) < 3


def test_geometry_round_trip_boxes():
    img = np.zeros((300, 400), np.float32)
    _, geom = Preprocessor(PreprocessConfig(image_size=100, clahe=False, center_fraction=0.8))(img)
    box = (120.0, 80.0, 260.0, 220.0)
    assert np.allclose(geom.box_to_original(geom.box_to_model(box)), box)


def test_heat_maps_to_the_right_place_after_crop():
    img = np.zeros((200, 400), np.float32)
    out, geom = Preprocessor(PreprocessConfig(image_size=100, clahe=False))(img)
    heat = np.zeros((100, 100), np.float32)
    heat[0:10, 0:10] = 1  # top-left of the model input
    back = geom.to_original(heat)
    ys, xs = np.nonzero(back > 0.5)
    assert xs.min() >= 100 and xs.max() < 125 and ys.max() < 25  # top-left of the centred crop (x0 = 100)


def test_presets_shapes_and_normalisation():
    cfg = PreprocessConfig(image_size=64)
    x = torch.full((1, 64, 64), 128, dtype=torch.uint8)
    ev = eval_transform(cfg)(x)
    assert ev.dtype == torch.float32 and ev.shape == (1, 64, 64)
    assert torch.allclose(ev, torch.full_like(ev, (128 / 255 - 0.5) / 0.25), atol=1e-5)
    torch.manual_seed(0)
    tr = train_transform(cfg)(x)
    assert tr.shape == (1, 64, 64) and tr.dtype == torch.float32


def test_config_round_trip_and_cache_key():
    cfg = PreprocessConfig(image_size=96, clahe=False)
    assert PreprocessConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.cache_key() != PreprocessConfig(image_size=96).cache_key()
    with pytest.raises(ValueError):
        PreprocessConfig(resize_mode="stretch")


def test_preprocessing_is_thread_safe():
    """One Preprocessor used from many threads (as the server's thread pool does) gives exactly the
    sequential result: no shared mutable OpenCV object (CLAHE) may mix the threads' images."""
    from concurrent.futures import ThreadPoolExecutor

    pre = Preprocessor(PreprocessConfig(image_size=256, clahe=True))
    images = [synthetic_cxr(300 + 7 * i, 280 + 5 * i, lesion=(100 + i, 90 + 2 * i), seed=i) for i in range(32)]
    sequential = [pre(im)[0] for im in images]
    for _ in range(3):
        with ThreadPoolExecutor(8) as pool:
            threaded = list(pool.map(lambda im: pre(im)[0], images * 4))
        differ = sum(not np.array_equal(t, sequential[i % len(images)]) for i, t in enumerate(threaded))
        assert differ == 0, f"{differ} of {len(threaded)} threaded outputs differ from the sequential ones"
