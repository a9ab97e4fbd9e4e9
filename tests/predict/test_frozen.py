"""Runs of many images compute the logits with a frozen TorchScript graph; it agrees with the eager model, a
graph that would differ is refused, and other users of the same run keep the eager model."""

from __future__ import annotations

import numpy as np
import torch

from cxrscreen.models.frozen import freeze_for_inference
from cxrscreen.models.registry import create_model
from cxrscreen.predict.predictor import FREEZE_MIN_IMAGES, Predictor, load_model
from tests.conftest import synthetic_cxr


def test_frozen_feature_head_agrees_with_eager_for_any_batch_size():
    torch.manual_seed(0)
    model = create_model("lite0_features", num_classes=3, in_chans=1, weights=None,
                         options={"stages": ["blocks.2", "blocks.4"], "flip": True}).eval()
    graph = freeze_for_inference(model, 64)
    assert graph is not None
    with torch.no_grad():
        for n in (1, 5):
            x = torch.randn(n, 1, 64, 64)
            assert torch.allclose(graph(x), model(x), atol=1e-4)


class _Branchy(torch.nn.Module):
    """Data-dependent control flow: a trace records one branch only, so its graph is wrong for other inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)
        return self.fc(z) if bool(x.abs().sum() == 0) else -self.fc(z) + 5


def test_a_graph_that_would_differ_from_the_eager_model_is_refused():
    assert freeze_for_inference(_Branchy().eval(), 32) is None


def test_predictor_freezes_only_for_many_inputs_and_leaves_the_run_to_others():
    run = load_model(None)
    few, many, other = Predictor(run), Predictor(run), Predictor(run)
    assert few.expect(FREEZE_MIN_IMAGES - 1) is False and few.run.frozen is None
    assert many.expect(FREEZE_MIN_IMAGES) is True and many.run.frozen is not None
    assert run.frozen is None and other.run is run and many.run.model is run.model  # a copy, same weights
    rng = np.random.default_rng(0)
    images = [(synthetic_cxr(224, 224, seed=i) * 255).astype(np.uint8) for i in range(3)]
    images = [np.clip(im.astype(int) + rng.integers(-3, 4, im.shape), 0, 255).astype(np.uint8) for im in images]
    assert np.allclose(many.probabilities(images), other.probabilities(images), atol=1e-4)


def test_the_server_serves_a_frozen_graph_warmed_for_every_forward_size():
    from cxrscreen.serving.app import load_for_serving

    run = load_for_serving(None, "torch")
    assert run.frozen is not None and run.model is not None  # Grad-CAM keeps the eager model
    eager = load_model(None)
    images = [(synthetic_cxr(224, 224, seed=i) * 255).astype(np.uint8) for i in range(9)]  # 8 + 1 per pass
    assert np.allclose(Predictor(run).probabilities(images), Predictor(eager).probabilities(images), atol=1e-4)
