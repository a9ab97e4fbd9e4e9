"""The reader thread of `Predictor.predict_files`: order kept, bad inputs in place, errors raised, stops early."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from cxrscreen.errors import CXRError
from cxrscreen.predict.inputs import read_ahead
from cxrscreen.predict.predictor import Predictor, load_model
from tests.conftest import synthetic_cxr


def test_order_kept_and_bad_inputs_yielded_in_place() -> None:
    def fn(i: int) -> int:
        time.sleep(0.001 * (i % 3))  # uneven work
        if i == 3:
            raise CXRError("bad file", f"f{i}")
        return 10 * i

    got = list(read_ahead(range(8), fn, depth=2))
    assert [i for i, _ in got] == list(range(8))
    assert [r for i, r in got if i != 3] == [10 * i for i in range(8) if i != 3]
    assert isinstance(got[3][1], CXRError) and got[3][1].problem == "bad file"


def test_other_errors_reach_the_consumer_and_early_close_stops_the_thread() -> None:
    def boom(i: int) -> int:
        if i == 2:
            raise ValueError("not a CXRError")
        return i

    with pytest.raises(ValueError, match="not a CXRError"):
        list(read_ahead(range(5), boom))
    started = threading.active_count()
    it = read_ahead(iter(range(10_000)), lambda i: i, depth=4)
    assert next(it) == (0, 0)
    it.close()
    time.sleep(0.3)
    assert threading.active_count() <= started
    assert not any(t.name == "cxrscreen-reader" for t in threading.enumerate())


def test_predict_files_with_the_reader_equals_one_file_at_a_time(tmp_path: Path) -> None:
    run = load_model(None)
    files = []
    for i in range(5):
        f = tmp_path / f"x{i}.png"
        cv2.imwrite(str(f), (synthetic_cxr(200 + 10 * i, 180, seed=i) * 255).astype(np.uint8))
        files.append(f)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    files.insert(2, bad)
    pred = Predictor(run, batch_size=2)
    out = list(pred.predict_files(files))
    assert [r.path for r, _ in out] == [str(f) for f in files]
    assert out[2][1] is None and out[2][0].error
    for (res, _), f in zip(out, files, strict=True):
        if f is bad:
            continue
        alone = Predictor(run).predict_files([f])
        ref = next(iter(alone))[0]
        assert res.label == ref.label
        assert max(abs(res.probabilities[k] - ref.probabilities[k]) for k in run.classes) <= 1e-5
