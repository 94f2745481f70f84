"""What a checkpoint means (its classes, config, components) is verified like its weights: an edited
sidecar, or a tensor file whose embedded metadata was changed, is refused instead of giving other
class names to the same scores. Property-based: hostile sidecars and headers give one-line errors only."""
from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors.torch import load as load_tensors, save as save_tensors

import emofuse
from emofuse.core import checkpoint as ckpt
from emofuse.core.errors import CheckpointError, EmofuseError

LABELS = ["neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised"]


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> Path:
    """The untrained speech checkpoint of the prediction tests (its meaning, not its accuracy, matters here)."""
    from test_predict import checkpoint

    return checkpoint.__wrapped__(tmp_path_factory)


def _copy(original: Path, tmp: Path) -> Path:
    for suffix in (".safetensors", ".json"):
        shutil.copy(original.with_suffix(suffix), tmp / f"model{suffix}")
    return tmp / "model.safetensors"


def _edit_sidecar(path: Path, **changes) -> None:
    sidecar = path.with_suffix(".json")
    meta = json.loads(sidecar.read_text())
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    sidecar.write_text(json.dumps(meta))


def test_the_original_loads(original):
    assert emofuse.load(original, device="cpu").label_names == LABELS


@pytest.mark.parametrize("drop_checksum", [False, True])
def test_permuted_label_names_in_the_sidecar_are_refused(original, tmp_path, drop_checksum):
    path = _copy(original, tmp_path)
    permuted = LABELS[::-1]
    _edit_sidecar(path, label_names=permuted, **({"sha256": None} if drop_checksum else {}))
    with pytest.raises(CheckpointError, match=r"model.json.*label_names"):
        emofuse.load(path, device="cpu")


def test_an_edited_config_or_component_list_in_the_sidecar_is_refused(original, tmp_path):
    path = _copy(original, tmp_path)
    meta = json.loads(path.with_suffix(".json").read_text())
    meta["config"]["branches"]["audio_text"]["dropout"] = 0.5
    _edit_sidecar(path, config=meta["config"])
    with pytest.raises(CheckpointError, match="config"):
        emofuse.load(path, device="cpu")
    path = _copy(original, tmp_path)
    _edit_sidecar(path, components=[])
    with pytest.raises(CheckpointError, match="components"):
        emofuse.load(path, device="cpu")


def _rewrite_header(path: Path, edit) -> None:
    """Rewrite the tensor file with edited embedded metadata; the tensors (and their hash) stay as they were."""
    blob = path.read_bytes()
    header = ckpt._header_metadata(blob)
    tensors = load_tensors(blob)
    edit(header)
    path.write_bytes(save_tensors(tensors, metadata=header))


def test_a_self_consistent_tensor_file_with_permuted_embedded_labels_is_refused(original, tmp_path):
    path = _copy(original, tmp_path)

    def permute(header):
        meta = json.loads(header[ckpt.META_KEY])
        meta["label_names"] = LABELS[::-1]
        header[ckpt.META_KEY] = json.dumps(meta, sort_keys=True)

    _rewrite_header(path, permute)
    _edit_sidecar(path, label_names=LABELS[::-1], sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    with pytest.raises(CheckpointError, match="metadata"):
        emofuse.load(path, device="cpu")
    path.with_suffix(".json").unlink()  # the tensor file alone
    with pytest.raises(CheckpointError, match="metadata"):
        emofuse.load(path, device="cpu")


def test_a_checkpoint_from_before_the_seal_loads_when_sidecar_and_header_agree(original, tmp_path):
    path = _copy(original, tmp_path)
    _rewrite_header(path, lambda header: header.pop(ckpt.SEAL_KEY))
    _edit_sidecar(path, sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    assert emofuse.load(path, device="cpu").label_names == LABELS
    _edit_sidecar(path, label_names=LABELS[::-1])
    with pytest.raises(CheckpointError, match="label_names"):
        emofuse.load(path, device="cpu")


# -- hostile sidecars and headers: one-line emofuse errors, nothing else ----------------------------
FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                         HealthCheck.function_scoped_fixture])
scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**9), st.floats(allow_nan=True), st.text(max_size=8))
json_like = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)), max_leaves=8)
SIDECAR_KEYS = ["config", "label_names", "components", "branch_order", "sha256", "format_version", "tensor_file"]


def _assert_one_line(path: Path) -> None:
    try:
        emofuse.load(path, device="cpu")
    except EmofuseError as exc:
        assert str(exc).strip() and "\n" not in str(exc)


@FUZZ
@given(top=st.one_of(json_like, st.dictionaries(st.sampled_from(SIDECAR_KEYS), json_like, max_size=4)),
       keep_sidecar_fields=st.booleans())
def test_any_sidecar_loads_or_fails_with_one_line(original, tmp_path_factory, top, keep_sidecar_fields):
    path = _copy(original, tmp_path_factory.mktemp("fuzz"))
    sidecar = path.with_suffix(".json")
    if keep_sidecar_fields and isinstance(top, dict):
        meta = json.loads(sidecar.read_text())
        meta.update(top)
        top = meta
    sidecar.write_text(json.dumps(top))
    _assert_one_line(path)


@FUZZ
@given(header=st.one_of(
    json_like.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.text(max_size=8), json_like, max_size=3).map(lambda d: json.dumps({"__metadata__": d}).encode()),
    st.dictionaries(st.sampled_from([ckpt.META_KEY, ckpt.TENSORS_HASH_KEY, ckpt.SEAL_KEY, "format"]),
                    st.one_of(st.text(max_size=12), json_like.map(json.dumps)), max_size=4)
    .map(lambda d: json.dumps({"__metadata__": d}).encode()),
    st.binary(max_size=40)),
    declared=st.one_of(st.none(), st.integers(0, 2**64 - 1)), sidecar=st.booleans())
def test_any_safetensors_header_loads_or_fails_with_one_line(original, tmp_path_factory, header, declared, sidecar):
    path = _copy(original, tmp_path_factory.mktemp("fuzz"))
    size = len(header) if declared is None else declared
    path.write_bytes(struct.pack("<Q", size) + header + b"\0" * 16)
    if not sidecar:
        path.with_suffix(".json").unlink()
    _assert_one_line(path)


def _forge(original: Path, tmp: Path, **changes) -> Path:
    """A checkpoint sealed by `save_checkpoint` itself around changed metadata (what a buggy writer
    or a deliberate forger produces): the loader must still answer with one line."""
    tensors, meta = ckpt.load_checkpoint(original)
    meta = {k: v for k, v in meta.items() if k not in ckpt.FILE_KEYS}
    meta.update(changes)
    return ckpt.save_checkpoint(tmp / "model", tensors, meta)


@pytest.mark.parametrize("changes", [
    {"components": "mm-lstm"}, {"components": ["x"]}, {"config": ["a"]}, {"label_names": LABELS[:5]},
    {"label_names": "neutral"}, {"label_names": [1, 2]}, {"branch_order": "audio_text"}, {"config": {"name": 3}},
])
def test_wrongly_typed_or_inconsistent_metadata_is_a_one_line_error(original, tmp_path, changes):
    path = _forge(original, tmp_path, **changes)
    with pytest.raises(EmofuseError) as info:
        emofuse.load(path, device="cpu")
    assert "\n" not in str(info.value) and str(path) in str(info.value)
