"""The PyTorch engine's BatchNorm-folded forward copy: same probabilities, the loaded model untouched, remade when
the model changes."""

from __future__ import annotations

import numpy as np
import torch

from cxrscreen.io.xray import XRay
from cxrscreen.models.fused import fold_batchnorms, forward_model
from cxrscreen.models.registry import create_model
from cxrscreen.predict.predictor import Predictor, load_model
from cxrscreen.tasks.classification import softmax
from tests.conftest import synthetic_cxr


def _feature_head() -> torch.nn.Module:
    """An untrained lite0 feature head with BatchNorm statistics far from the identity (as trained ones are)."""
    torch.manual_seed(0)
    m = create_model("lite0_features", num_classes=3, weights=None)
    with torch.no_grad():
        for bn in (x for x in m.modules() if isinstance(x, torch.nn.BatchNorm2d)):
            bn.running_mean.normal_(0, 0.5)
            bn.running_var.uniform_(0.2, 3.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.3)
        m.head.weight.normal_(0, 0.2)
    return m.eval()


def test_folded_copy_gives_the_same_logits_and_leaves_the_model_alone() -> None:
    m = _feature_head()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    folded, n = fold_batchnorms(m)
    assert n == 49  # every BatchNorm of EfficientNet-Lite0 (stem, 16 blocks, head)
    assert not any(isinstance(x, torch.nn.BatchNorm2d) for x in folded.modules())
    assert m.state_dict().keys() == before.keys()  # the model to save, explain and refit is unchanged
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    x = torch.randn(3, 1, 96, 96)
    with torch.no_grad():
        a, b = m(x).numpy(), folded(x).numpy()
    assert np.abs(softmax(a) - softmax(b)).max() <= 1e-5
    assert np.abs(a - b).max() <= 1e-4


def test_forward_copy_is_cached_and_remade_when_the_model_changes() -> None:
    m = _feature_head()
    f = forward_model(m)
    assert f is not m and forward_model(m) is f
    with torch.no_grad():
        m.head.bias.add_(1.0)  # a refitted head
    g = forward_model(m)
    assert g is not f
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.allclose(g(x), m(x), atol=1e-4)
    assert forward_model(m.train()) is m  # training runs the model itself
    resnet = create_model("resnet18", num_classes=3, weights=None).eval()
    assert forward_model(resnet) is resnet  # nothing folds outside timm EfficientNet modules


def test_bundled_model_probabilities_unchanged_by_folding() -> None:
    """The bundled model through the Predictor (folded copy) against the loaded model itself, on synthetic
    X-rays: probabilities within 1e-5."""
    run = load_model(None)
    pred = Predictor(run)
    preps = [pred.prepare(XRay(synthetic_cxr(300, 260, lesion=les, seed=s), f"s{s}.png", {}))
             for s, les in ((1, (120, 80)), (2, None), (3, (200, 180)), (4, (60, 60)))]
    got = pred.probabilities([p.image for p in preps])
    from cxrscreen.transforms.preprocess import to_model_array

    with torch.no_grad():
        logits = run.model(torch.from_numpy(to_model_array([p.image for p in preps], run.preprocess))).numpy()
    assert np.abs(got - softmax(logits, run.temperature)).max() <= 1e-5
