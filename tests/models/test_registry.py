import pytest
import torch
from torch import nn

from cxrscreen.errors import CXRError
from cxrscreen.models.registry import available_models, cam_target_layer, create_model, get_spec


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "densenet121"])
def test_grey_input_and_logits(name):
    m = create_model(name, num_classes=3).eval()
    with torch.no_grad():
        y = m(torch.randn(2, 1, 64, 64))
    assert y.shape == (2, 3)
    assert isinstance(cam_target_layer(name, m), nn.Module)


def test_study_models_are_registered_with_their_layers():
    for name in ("densenet169", "vgg16", "inception_v3", "resnet152", "mobilenet_v3_large"):
        assert name in available_models()
    assert get_spec("inception_v3").default_size == 299


def test_unknown_arch_lists_known():
    with pytest.raises(CXRError, match="resnet18"):
        create_model("alexnet2")


def test_imagenet_weights_folded_to_grey_and_clear_error():
    def fake_loader(tv_name, **kw):
        from torchvision import models

        m = models.get_model(tv_name, weights=None)
        with torch.no_grad():
            m.conv1.weight.fill_(1.0)
        return m

    m = create_model("resnet18", weights="imagenet", loader=fake_loader)
    assert m.conv1.in_channels == 1 and torch.allclose(m.conv1.weight, torch.full_like(m.conv1.weight, 3.0))
    assert m.fc.out_features == 3

    def offline(tv_name, **kw):

        raise CXRError("ImageNet weights for resnet18 could not be loaded (offline)")

    with pytest.raises(CXRError, match="ImageNet weights"):
        create_model("resnet18", weights="imagenet", loader=offline)
