"""Dataset readers on the real shared corpora: counts, labels, metadata, joins, and bad rows."""
from __future__ import annotations

import gzip
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from emofuse.core.engine.compose import build_reader, default_data_dir
from emofuse.core.config import DataConfig
from emofuse.core.errors import ConfigError, DataError

DATA = default_data_dir()
pytestmark = pytest.mark.skipif(DATA is None, reason="the shared corpora (../shared/data) are not beside this checkout")


def read(dataset: str, *, skip: bool = False, data_dir: Path | None = None, **options):
    reader = build_reader(DataConfig(dataset=dataset, options=options, data_dir=data_dir))
    reader.on_bad_sample = "skip" if skip else "error"
    return reader, list(reader.samples())


@pytest.fixture(scope="module")
def ravdess():
    return read("ravdess")[1]


def test_ravdess_labels_speakers_text_and_sex_come_from_the_file_name(ravdess):
    assert len(ravdess) == 720
    counts = Counter(s.label_name for s in ravdess)
    assert counts == {"neutral": 48, "calm": 96, "happy": 96, "sad": 96, "angry": 96, "fearful": 96,
                      "disgust": 96, "surprised": 96}
    assert len({s.speaker for s in ravdess}) == 12
    by_id = {s.id: s for s in ravdess}
    s = by_id["01-05-02-02-01-07"]  # speech, angry, strong, statement 2, repetition 1, actor 7
    assert (s.label, s.label_name, s.speaker, s.gender) == (4, "angry", "Actor_07", "male")
    assert s.text == "Dogs are sitting by the door"
    assert s.extra["intensity"] == "strong" and s.extra["repetition"] == 1
    assert s.audio_path.endswith("Actor_07/03-01-05-02-02-01-07.ogg") and s.video_path is None
    assert by_id["01-05-02-02-01-08"].gender == "female"


def test_ravdess_joins_the_action_unit_and_mfcc_table(ravdess):
    assert all(set(s.features) == {"au", "mfcc"} for s in ravdess)
    s = next(s for s in ravdess if s.id == "01-01-01-01-01-01")
    assert s.features["au"].shape == (35,) and s.features["mfcc"].shape == (259,)
    assert s.features["au"][2] == pytest.approx(0.93051)  # the table's au_02 for 01-01-01-01-01-01-01
    assert s.features["mfcc"][0] == pytest.approx(-65.8251)


def test_ravdess_audio_visual_layout_pairs_video_with_speech_audio(tmp_path):
    src = DATA / "ravdess-speech" / "Actor_01"
    crema_flv = DATA / "crema-d" / "media" / "1001_DFA_ANG_XX.flv"
    (tmp_path / "Actor_01").mkdir()
    shutil.copy(src / "03-01-05-01-01-01-01.ogg", tmp_path / "Actor_01")
    (tmp_path / "Actor_01" / "01-01-05-01-01-01-01.flv").symlink_to(crema_flv)  # a real AV container
    (tmp_path / "Actor_01" / "02-01-03-01-01-01-01.flv").symlink_to(crema_flv)  # video-only clip
    _, samples = read("ravdess", root=str(tmp_path), feature_table=None)
    by_id = {s.id: s for s in samples}
    angry = by_id["01-05-01-01-01-01"]
    assert angry.video_path.endswith("01-01-05-01-01-01-01.flv")
    assert angry.audio_path.endswith("03-01-05-01-01-01-01.ogg")  # the speech file beats the video's track
    happy = by_id["01-03-01-01-01-01"]
    assert happy.video_path.endswith("02-01-03-01-01-01-01.flv") and happy.audio_path is None
    assert all(not s.features for s in samples)


def test_label_outside_the_set_is_an_error_naming_the_file_and_label_map_maps_explicitly():
    with pytest.raises(DataError, match=r"03-01-02-01-01-01-01\.ogg: label 'calm' is not in the label set"):
        read("ravdess", labels=["neutral", "happy", "sad", "angry", "fearful", "disgust", "surprised"])
    reader, samples = read("ravdess", labels="neutral,happy,sad,angry",
                           label_map={"calm": "neutral", "fearful": None, "disgust": None, "surprised": None})
    assert Counter(s.label_name for s in samples) == {"neutral": 144, "happy": 96, "sad": 96, "angry": 96}
    assert reader.excluded == {"fearful": 96, "disgust": 96, "surprised": 96}
    reader, samples = read("ravdess", skip=True, labels=["neutral", "happy"])
    assert len(samples) == 48 + 96 and len(reader.skipped) == 720 - 144
    with pytest.raises(ConfigError, match="label_map"):
        read("ravdess", labels=["neutral"], label_map={"calm": "relaxed"})


def test_crema_d_joins_demographics_and_picks_media_by_extension():
    _, samples = read("crema-d")
    assert len(samples) == 12
    assert Counter(s.label_name for s in samples) == {e: 2 for e in ("neutral", "happy", "sad", "angry",
                                                                     "fearful", "disgust")}
    by_id = {s.id: s for s in samples}
    flv, mp3 = by_id["1001_DFA_HAP_XX"], by_id["1002_DFA_SAD_XX"]
    assert (flv.speaker, flv.age, flv.gender) == ("1001", 51.0, "Male")
    assert (mp3.speaker, mp3.age, mp3.gender) == ("1002", 21.0, "Female")
    assert flv.video_path.endswith(".flv") and flv.audio_path == flv.video_path
    assert mp3.audio_path.endswith(".mp3") and mp3.video_path is None
    assert flv.text == "Don't forget a jacket" and flv.extra["level"] == "unspecified"


def test_crema_d_actor_missing_from_demographics_is_bad_input(tmp_path):
    (tmp_path / "1099_DFA_ANG_XX.mp3").symlink_to(DATA / "crema-d" / "media" / "1002_DFA_ANG_XX.mp3")
    shutil.copy(DATA / "crema-d" / "VideoDemographics.csv", tmp_path)
    with pytest.raises(DataError, match="1099_DFA_ANG_XX.mp3: actor 1099 has no row"):
        read("crema-d", root=str(tmp_path))


def test_meld_reads_both_partitions_with_dialogue_utterance_and_speaker():
    reader, samples = read("meld")
    parts = Counter(s.extra["partition"] for s in samples)
    assert parts == {"train": 9989, "dev": 1109}
    assert reader.label_names == ["neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear"]
    first = samples[0]
    assert (first.id, first.speaker, first.dialogue_id, first.utterance_index) == ("train-dia0_utt0", "Chandler",
                                                                                  "train-0", 0)
    assert first.text.startswith("also I was the point person")
    assert first.audio_path is None and first.video_path is None  # no clips in the shared slice
    assert all(s.speaker and s.dialogue_id and s.utterance_index is not None for s in samples)
    assert Counter(s.label_name for s in samples if s.extra["partition"] == "train")["neutral"] == 4710


def test_meld_finds_clips_and_rejects_an_empty_transcript(tmp_path):
    rows = ["Sr No.,Utterance,Speaker,Emotion,Sentiment,Dialogue_ID,Utterance_ID",
            '1,"Hi, there.",Ross,joy,positive,3,0', "2,,Rachel,neutral,neutral,3,1"]
    (tmp_path / "train_sent_emo.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "train_splits").mkdir()
    (tmp_path / "train_splits" / "dia3_utt0.mp4").symlink_to(DATA / "crema-d" / "media" / "1001_DFA_ANG_XX.flv")
    with pytest.raises(DataError, match=r"train_sent_emo.csv:3: empty transcript"):
        read("meld", root=str(tmp_path))
    reader, samples = read("meld", root=str(tmp_path), skip=True)
    assert [s.id for s in samples] == ["train-dia3_utt0"]
    assert samples[0].video_path.endswith("dia3_utt0.mp4") and samples[0].audio_path == samples[0].video_path
    assert reader.skipped == [(f"{tmp_path / 'train_sent_emo.csv'}:3", "empty transcript (Utterance)")]


def test_meld_missing_column_names_the_file_and_column(tmp_path):
    (tmp_path / "train_sent_emo.csv").write_text("Utterance,Speaker,Emotion,Dialogue_ID\nhi,Ross,joy,0\n")
    with pytest.raises(DataError, match=r"train_sent_emo.csv:1: missing column 'Utterance_ID'"):
        read("meld", root=str(tmp_path))


def _manifest_rows():
    speech = DATA / "ravdess-speech"
    return [
        {"id": "a", "label": "happy", "speaker": "s1", "age": 30, "gender": "F", "text": "hello there",
         "audio": str(speech / "Actor_02" / "03-01-03-01-01-01-02.ogg"), "au": [0.1, 0.2, 0.3]},
        {"id": "b", "label": "sad", "speaker": "s2", "age": None, "gender": "M", "text": "bye now",
         "video": str(DATA / "crema-d" / "media" / "1001_DFA_SAD_XX.flv"), "au": [0.4, 0.5, 0.6]},
    ]


def test_manifest_jsonl_and_csv_give_the_same_samples(tmp_path):
    rows = _manifest_rows()
    jsonl = tmp_path / "clips.jsonl.gz"
    with gzip.open(jsonl, "wt") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    header = "id,label,speaker,age,gender,text,audio,video,au_0,au_1,au_2"
    lines = [header] + [",".join([r["id"], r["label"], r["speaker"], str(r["age"] or ""), r["gender"], r["text"],
                                  r.get("audio", ""), r.get("video", "")] + [str(v) for v in r["au"]]) for r in rows]
    csv_path = tmp_path / "clips.csv"
    csv_path.write_text("\n".join(lines) + "\n")
    results = []
    for path, sets in ((jsonl, {"au": "au"}), (csv_path, {"au": "au_"})):
        _, samples = read("manifest", data_dir=tmp_path, path=path.name, labels=["sad", "happy"], feature_sets=sets)
        results.append(samples)
    for a, b in zip(*results):
        assert (a.id, a.label, a.speaker, a.age, a.gender, a.text, a.audio_path, a.video_path) == \
               (b.id, b.label, b.speaker, b.age, b.gender, b.text, b.audio_path, b.video_path)
        np.testing.assert_allclose(a.features["au"], b.features["au"])
    a, b = results[0]
    assert (a.label, b.label, a.age, b.age) == (1, 0, 30.0, None)
    assert a.audio_path.endswith(".ogg") and a.video_path is None and b.video_path.endswith(".flv")


def test_manifest_bad_rows_name_the_row(tmp_path):
    ogg = DATA / "ravdess-speech" / "Actor_01" / "03-01-01-01-01-01-01.ogg"
    path = tmp_path / "m.csv"
    path.write_text(f"id,label,text,audio\nok,happy,hi,{ogg}\nx,joyful,hi,{ogg}\ny,happy,,{ogg}\n"
                    f"z,happy,hi,{tmp_path / 'gone.wav'}\n")
    with pytest.raises(DataError, match=r"m.csv:3: label 'joyful' is not in the label set"):
        read("manifest", data_dir=tmp_path, path="m.csv", labels=["happy"])
    reader, samples = read("manifest", data_dir=tmp_path, path="m.csv", labels=["happy"], skip=True)
    assert [s.id for s in samples] == ["ok"]
    assert [w.rsplit(":", 1)[1] for w, _ in reader.skipped] == ["3", "4", "5"]
    assert "gone.wav does not exist" in reader.skipped[2][1]
    with pytest.raises(ConfigError, match="label set"):
        read("manifest", data_dir=tmp_path, path="m.csv")
    with pytest.raises(DataError, match=r"m.csv:1: missing column 'clip'"):
        read("manifest", data_dir=tmp_path, path="m.csv", labels=["happy"], columns={"id": "clip"})


def test_feature_table_joins_a_table_to_another_corpus(tmp_path):
    reader, samples = read("feature-table", feature_sets={"au": "au_"})
    assert len(samples) == 720 and all(set(s.features) == {"au"} for s in samples)
    table = tmp_path / "t.csv"
    table.write_text("name,f_a,f_b\n1001_DFA_ANG_XX,1,2\n1001_DFA_SAD_XX,3,nan\n")
    reader, samples = read("feature-table", skip=True, base="crema-d", base_options={}, table=str(table),
                           id_column="name", key_pattern=None, feature_sets={"f": "f_"})
    by_id = {s.id: s for s in samples}
    np.testing.assert_allclose(by_id["1001_DFA_ANG_XX"].features["f"], [1, 2])
    assert by_id["1001_DFA_SAD_XX"].features == {}  # its row was bad (NaN) and is listed as skipped
    assert reader.skipped and reader.skipped[0][0].endswith("t.csv:3") and "non-finite" in reader.skipped[0][1]


def _hundred_row_manifest(tmp_path, broken_row: str | None) -> Path:
    ogg = sorted((DATA / "ravdess-speech" / "Actor_01").glob("*.ogg"))[0]
    rows = ["id,label,text,audio"] + [f'c{i},happy,"line {i}, said once",{ogg}' for i in range(100)]
    if broken_row is not None:
        rows[6] = broken_row
    path = tmp_path / "m.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.mark.parametrize("broken", ['c5,happy,"an unterminated quote,x.ogg', 'c5,happy,"one" two,x.ogg'])
def test_a_csv_quote_error_fails_naming_the_row_instead_of_swallowing_the_rows_after_it(tmp_path, broken):
    _hundred_row_manifest(tmp_path, None)
    assert len(read("manifest", data_dir=tmp_path, path="m.csv", labels=["happy"])[1]) == 100
    _hundred_row_manifest(tmp_path, broken)
    for skip in (False, True):  # a file that cannot be parsed is an error whatever the bad-sample policy
        with pytest.raises(DataError, match=r"m.csv:7: .*quot"):
            read("manifest", data_dir=tmp_path, path="m.csv", labels=["happy"], skip=skip)


def test_a_csv_row_with_too_few_fields_is_bad_input(tmp_path):
    path = tmp_path / "m.csv"
    ogg = sorted((DATA / "ravdess-speech" / "Actor_01").glob("*.ogg"))[0]
    path.write_text(f"id,label,text,audio\na,happy,hi,{ogg}\nb,happy\n")
    with pytest.raises(DataError, match=r"m.csv:3: row has 2 fields, the header has 4"):
        read("manifest", data_dir=tmp_path, path="m.csv", labels=["happy"])


def test_emodb_labels_speakers_sex_age_and_sentence_come_from_the_file_name():
    _, clips = read("emodb")
    assert len(clips) == 535
    assert Counter(s.label_name for s in clips) == {"angry": 127, "bored": 81, "neutral": 79, "happy": 71,
                                                     "fearful": 69, "sad": 62, "disgust": 46}
    assert len({s.speaker for s in clips}) == 10
    s = next(s for s in clips if s.id == "03a01Fa")  # speaker 03 (male, 31), text a01, happiness, take a
    assert (s.label_name, s.speaker, s.gender, s.age) == ("happy", "03", "male", 31.0)
    assert s.text == "Der Lappen liegt auf dem Eisschrank." and s.extra["text_code"] == "a01"
    assert s.audio_path.endswith("emodb/wav/03a01Fa.ogg")
    assert {s.gender for s in clips if s.speaker == "09"} == {"female"}


def test_emodb_refuses_a_name_that_is_no_code_and_skips_it_on_request(tmp_path):
    src = DATA / "emodb" / "wav"
    for name in ("03a01Fa.ogg", "08a02Wc.ogg"):
        shutil.copy(src / name, tmp_path / name)
    shutil.copy(src / "03a01Fa.ogg", tmp_path / "99a01Fa.ogg")  # speaker 99 is not in EmoDB
    with pytest.raises(DataError, match="99a01Fa.ogg.*speaker '99'"):
        read("emodb", root=str(tmp_path))
    reader, clips = read("emodb", skip=True, root=str(tmp_path))
    assert sorted(s.id for s in clips) == ["03a01Fa", "08a02Wc"] and len(reader.skipped) == 1
