"""Grad-CAM with only the target layer's gradients (`explain.head_grad`): the same heat map as a full backward
pass, no parameter gradient, and the model left as it was."""

from __future__ import annotations

import numpy as np
import pytest

from cxrscreen.explain.cam import Explainer
from cxrscreen.explain.head_grad import head_gradients_only
from cxrscreen.io.xray import XRay
from cxrscreen.predict.predictor import Predictor, load_model
from tests.conftest import synthetic_cxr


@pytest.fixture(scope="module")
def bundled():  # noqa: ANN201
    return load_model()


def test_same_heat_map_without_parameter_gradients(bundled) -> None:  # noqa: ANN001
    ex = Explainer(bundled, lungs=False)
    prep = Predictor(bundled).prepare(XRay(synthetic_cxr(300, 280, lesion=(120, 100), seed=5), "x.png", {}))
    full = ex.heatmap(prep, "covid")
    for p in bundled.model.parameters():
        p.grad = None
    with head_gradients_only(bundled.model, ex.layer):
        fast = ex.heatmap(prep, "covid")
        assert not any(p.requires_grad for p in bundled.model.parameters())
    assert np.allclose(fast, full, atol=1e-6) and fast.max() > 0
    assert all(p.grad is None for p in bundled.model.parameters())  # no weight gradient was computed
    assert all(p.requires_grad for p in bundled.model.parameters())  # restored
    assert not ex.layer._forward_hooks  # the leaf hook is gone
