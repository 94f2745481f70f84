"""The pipeline end to end on real clips: batches, the train-only normaliser, and bad input."""
from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch

from emofuse.core.engine.compose import default_data_dir
from emofuse.core.config import DataConfig
from emofuse.core.data.normalize import Normalizer
from emofuse.core.data.pipeline import load_data, make_batch
from emofuse.core.errors import DataError
from emofuse.core.types import MODALITIES

DATA = default_data_dir()
pytestmark = pytest.mark.skipif(DATA is None, reason="the shared corpora (../shared/data) are not beside this checkout")


@pytest.fixture(scope="module")
def ravdess(tmp_path_factory):
    return load_data(DataConfig(dataset="ravdess"), {"audio", "text", "features"},
                     split_dir=tmp_path_factory.mktemp("run"))


def test_normaliser_is_fitted_on_the_training_split_only(ravdess):
    train = np.stack([s.features["au"] for s in ravdess.splits["train"]]).astype(np.float64)
    everything = np.stack([s.features["au"] for k in ("train", "val", "test") for s in ravdess.splits[k]])
    mean = ravdess.normalizer.feature_mean["au"].numpy()
    np.testing.assert_allclose(mean, train.mean(axis=0), rtol=1e-5, atol=1e-6)
    assert not np.allclose(mean, everything.mean(axis=0), rtol=1e-3, atol=1e-4)
    loader = ravdess.loader("train", batch_size=len(ravdess.splits["train"]), shuffle=False, seed=0,
                            modalities={"features"})
    (batch,) = list(loader)
    au = batch.features["au"]
    assert au.mean(dim=0).abs().max() < 1e-4
    varying = torch.from_numpy(train.std(axis=0) > 1e-6)
    assert torch.allclose(au.std(dim=0, unbiased=False)[varying], torch.ones(int(varying.sum())), atol=1e-3)
    restored = Normalizer.from_state_dict(ravdess.normalizer.state_dict())
    assert restored.fingerprint() == ravdess.normalizer.fingerprint()


def test_loader_yields_normalised_batches_with_audio_text_features_and_masks(ravdess):
    loader = ravdess.loader("val", batch_size=8, shuffle=True, seed=3, modalities={"audio", "text", "features"},
                            num_workers=2)
    batches = list(loader)
    assert sum(len(b) for b in batches) == len(ravdess.splits["val"])
    b = batches[0]
    assert b.video is None and b.audio.dim() == 2 and b.audio.shape[0] == 8
    assert int(b.audio_lengths.max()) == b.audio.shape[1] and (b.audio_lengths > 16_000).all()
    assert b.text[0] in ("Kids are talking by the door", "Dogs are sitting by the door")
    assert b.features["au"].shape == (8, 35) and b.features["mfcc"].shape == (8, 259)
    assert set(b.present) == set(MODALITIES) and not b.present["video"].any() and b.present["audio"].all()
    assert torch.isnan(b.age).all() and set(b.gender.tolist()) <= {1, 2}
    assert len(b.extra["keys"]) == 8 and set(b.extra["modality_keys"]) == set(MODALITIES)
    ids_again = [i for batch in ravdess.loader("val", batch_size=8, shuffle=True, seed=3, modalities={"text"})
                 for i in batch.ids]
    assert ids_again == [i for batch in batches for i in batch.ids]  # the seed fixes the order
    assert ravdess.class_counts("train").sum() == len(ravdess.splits["train"])


def test_video_batches_from_real_flv_and_zeros_where_absent():
    bundle = load_data(DataConfig(dataset="crema-d", split="balanced"), {"video", "audio", "metadata"})
    samples = sorted(bundle.splits["train"], key=lambda s: s.id)
    batch = make_batch([samples[0], samples[-1]], {"video", "audio", "metadata"}, bundle.normalizer)
    assert batch.ids == ["1001_DFA_ANG_XX", "1002_DFA_SAD_XX"]
    assert batch.video.shape == (2, 8, 3, 224, 224) and batch.present["video"].tolist() == [True, False]
    assert batch.video[1].abs().sum() == 0 and batch.video[0].std() > 0.1
    assert batch.audio_lengths.tolist()[1] == pytest.approx(2.403 * 16_000, abs=16)
    assert batch.age.tolist() == pytest.approx([1.0, -1.0])  # 51 and 21, standardised on train
    assert batch.gender.tolist() == [1, 2]


@pytest.fixture
def bad_manifest(tmp_path):
    """Real clips plus a truncated, a garbage and an empty one, all with the right extensions."""
    speech = sorted((DATA / "ravdess-speech").glob("Actor_0[1-4]/03-01-0[35]-01-01-01-*.ogg"))
    rows = ["id,label,speaker,audio"]
    for p in speech:
        rows.append(f"{p.stem},{'happy' if '-03-' in p.name else 'angry'},{p.parent.name},{p}")
    truncated = tmp_path / "truncated.ogg"
    data = speech[0].read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.mp3"
    garbage.write_bytes(np.random.default_rng(1).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    empty = tmp_path / "empty.flv"
    empty.write_bytes(b"")
    for name, p in (("t", truncated), ("g", garbage), ("e", empty)):
        rows.append(f"{name},happy,Actor_01,{p.name}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    return tmp_path


def manifest_config(folder, **kw):
    return DataConfig(dataset="manifest", data_dir=folder, split="balanced",
                      options={"path": "m.csv", "labels": ["happy", "angry"]}, **kw)


def test_bad_files_are_an_error_naming_the_file_by_default(bad_manifest):
    # Every file whose header cannot be read is named in one error, before the split is made.
    with pytest.raises(DataError, match=r"manifest: 2 of 11 clips cannot be read: ") as info:
        load_data(manifest_config(bad_manifest), {"audio"})
    assert "garbage.mp3 (not a readable media file" in str(info.value) and "empty.flv (file is empty)" in str(info.value)
    assert "\n" not in str(info.value) and str(info.value).count(str(bad_manifest / "empty.flv")) == 1
    # A file cut short has a good header: it is named when it is decoded.
    lines = (bad_manifest / "m.csv").read_text().splitlines()
    (bad_manifest / "m.csv").write_text("\n".join(l for l in lines if not l.startswith(("g,", "e,"))) + "\n")
    bundle = load_data(manifest_config(bad_manifest), {"audio"})
    everything = bundle.splits["train"] + bundle.splits["val"] + bundle.splits["test"]
    with pytest.raises(DataError) as info:
        make_batch(everything, {"audio"}, bundle.normalizer)
    assert str(info.value).startswith(f"{bad_manifest / 'truncated.ogg'}: Ogg stream has no end-of-stream page")
    assert str(info.value).count("truncated.ogg") == 1  # the path once, not "path: path: reason"
    with pytest.raises(DataError, match="truncated.ogg: Ogg stream has no end-of-stream page"):
        make_batch([s for s in everything if s.id == "t"], {"audio"}, bundle.normalizer)
    with pytest.raises(DataError):
        for split in ("train", "val", "test"):
            for _ in bundle.loader(split, batch_size=4, shuffle=False, seed=0, modalities={"audio"}, num_workers=2):
                pass


def test_skip_mode_counts_and_lists_every_bad_file(bad_manifest):
    bundle = load_data(manifest_config(bad_manifest, on_bad_sample="skip"), {"audio"})
    seen = []
    for split in ("train", "val", "test"):
        for batch in bundle.loader(split, batch_size=4, shuffle=False, seed=0, modalities={"audio"}):
            seen += batch.ids
    n = sum(len(v) for v in bundle.splits.values())
    assert n == 9 and not {"g", "e"} & {s.id for v in bundle.splits.values() for s in v}  # left out before the split
    assert len(seen) == n - 1 and not {"t", "g", "e"} & set(seen)
    assert sorted(w.rsplit("/", 1)[1] for w, _ in bundle.skipped) == ["empty.flv", "garbage.mp3", "truncated.ogg"]
    assert "3 sample(s) skipped" in bundle.skipped_report() and "truncated" in bundle.skipped_report()
    # A second epoch lists them once, not twice.
    for _ in bundle.loader("train", batch_size=4, shuffle=False, seed=0, modalities={"audio"}):
        pass
    assert len(bundle.skipped) == 3
    everything = bundle.splits["train"] + bundle.splits["val"] + bundle.splits["test"]
    batch = make_batch(everything, {"audio"}, bundle.normalizer, on_bad_sample="skip")
    assert len(batch) == n - 1 and len(batch.extra["skipped"]) == 1


def test_manifest_row_naming_a_missing_file_is_bad_input_at_load(bad_manifest):
    (bad_manifest / "m.csv").write_text(f"id,label,speaker,audio\nx,happy,a,{bad_manifest / 'gone.ogg'}\n"
                                        f"y,happy,b,{bad_manifest / 'truncated.ogg'}\n")
    with pytest.raises(DataError, match=r"m.csv:2: audio file .*gone.ogg does not exist"):
        load_data(manifest_config(bad_manifest), {"audio"})
    bundle = load_data(manifest_config(bad_manifest, on_bad_sample="skip"), {"audio"})
    assert [s.id for s in bundle.splits["train"]] == ["y"] and len(bundle.skipped) == 1


def test_missing_modality_is_data_not_an_error(tmp_path):
    ogg = DATA / "ravdess-speech" / "Actor_01" / "03-01-01-01-01-01-01.ogg"
    shutil.copy(ogg, tmp_path / "a.ogg")
    (tmp_path / "m.csv").write_text("id,label,audio,text\na,happy,a.ogg,hello\nb,happy,,hi\n")
    config = DataConfig(dataset="manifest", data_dir=tmp_path, split="balanced",
                        options={"path": "m.csv", "labels": ["happy"]})
    bundle = load_data(config, {"audio", "text", "video"})
    batch = make_batch(bundle.splits["train"], {"audio", "text", "video"}, bundle.normalizer)
    assert batch.present["audio"].tolist() == [True, False] and batch.audio_lengths[1] == 0
    assert batch.present["video"].tolist() == [False, False] and batch.video.abs().sum() == 0
    assert math.isnan(batch.age[0]) and batch.text == ["hello", "hi"]
