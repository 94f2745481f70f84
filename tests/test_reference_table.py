"""The reference-table benchmark's protocol pieces: actor folds, the logistic-regression baselines on the
same folds (fit on train+val as reported, and on the models' training actors only), and the paired
comparison of each model with the baseline that reads the same inputs."""
from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import reference_table as rt  # noqa: E402


@pytest.fixture(scope="module")
def ravdess(shared_data):
    config = rt.base_config(shared_data, [], Path("unused"))
    samples = rt.corpus_samples(config)
    return samples, {s.id: s for s in samples}


def test_actor_folds_test_every_actor_once_and_keep_splits_apart(ravdess):
    samples, by_id = ravdess
    folds = rt.actor_folds(samples, 4)
    assert len(folds) == 4
    tested = Counter()
    for split in folds:
        actors = {part: {by_id[i].speaker for i in split[part]} for part in ("train", "val", "test")}
        assert len(actors["test"]) == 3 and len(actors["val"]) == 2 and len(actors["train"]) == 7
        assert not (actors["test"] & actors["val"]) and not (actors["train"] & (actors["test"] | actors["val"]))
        assert sum(len(v) for v in split.values()) == len(samples)  # every clip has a role in every fold
        tested.update(actors["test"])
    assert set(tested.values()) == {1} and len(tested) == 12


def test_actor_folds_refuse_impossible_counts(ravdess):
    samples, _ = ravdess
    with pytest.raises(SystemExit, match="--folds"):
        rt.actor_folds(samples, 1)
    with pytest.raises(SystemExit, match="--folds"):
        rt.actor_folds(samples, 13)


def test_baselines_fit_on_the_chosen_actors_and_beat_chance_from_real_action_units(ravdess):
    samples, by_id = ravdess
    split = rt.actor_folds(samples, 4)[0]
    rng = np.random.default_rng(0)
    # real action units; stand-in audio functionals with no signal (openSMILE over 720 clips is slow)
    noise = {s.id: rng.normal(size=88) for s in samples}
    both = rt.baseline_scores(samples, split, {"egemaps": noise}, 8, fit_on=("train", "val"))
    train_only = rt.baseline_scores(samples, split, {"egemaps": noise}, 8, fit_on=("train",))
    assert set(both) == {"au", "egemaps", "concat", "average"}
    assert both["au"]["accuracy"] > 0.4 and train_only["au"]["accuracy"] > 0.4  # chance is 1/8
    assert both["egemaps"]["accuracy"] < 0.3  # noise stays near chance
    assert both["au"]["accuracy"] != train_only["au"]["accuracy"]  # two more actors change the fit


def test_egemaps_functionals_are_cached_per_clip(ravdess, tmp_path):
    samples, _ = ravdess
    few = samples[:3]
    cache = tmp_path / "eg.json"
    first = rt.egemaps_functionals(few, cache)
    assert cache.is_file() and set(first) == {s.id for s in few}
    assert all(v.shape == (88,) and np.isfinite(v).all() for v in first.values())
    again = rt.egemaps_functionals(few, cache)
    assert all(np.allclose(first[k], again[k]) for k in first)


def _scores(acc: dict[str, float]) -> dict[str, dict[str, float]]:
    return {k: {"accuracy": v, "macro_f1": v, "weighted_f1": v, "uar": v} for k, v in acc.items()}


def test_each_model_is_paired_fold_by_fold_with_the_baseline_reading_the_same_inputs():
    rows = lambda au, audio, fused: [  # noqa: E731
        {"key": "branch:video", "model": "video alone", "modalities": "text+metadata+features", "accuracy": au},
        {"key": "branch:audio_text", "model": "audio alone", "modalities": "audio+text+metadata", "accuracy": audio},
        {"key": "fusion:late", "model": "fusion: late", "modalities": "audio+text+metadata+features",
         "accuracy": fused},
    ]
    per_fold = [rows(0.60, 0.50, 0.70), rows(0.50, 0.40, 0.66)]
    base = {"au": 0.55, "egemaps": 0.45, "concat": 0.68, "average": 0.60}
    harder = {k: v - 0.1 for k, v in base.items()}  # the second fold is harder for everyone
    runs = {"train+val": [_scores(base), _scores(harder)],
            "train": [_scores({k: v - 0.05 for k, v in base.items()}), _scores({k: v - 0.05 for k, v in harder.items()})]}
    versus = rt.versus_baselines(per_fold, runs)
    by = {(v["key"], v["baseline_kind"]): v for v in versus}
    assert set(by) == {("branch:video", "au"), ("branch:audio_text", "egemaps"), ("fusion:late", "concat"),
                       ("fusion:late", "average")}
    video = by[("branch:video", "au")]
    assert video["diff"] == pytest.approx(0.05) and video["diff_std"] == pytest.approx(0.0)
    assert video["folds_won"] == "2/2" and rt.verdict_of(video) == "clearly above"  # a steady margin
    concat = by[("fusion:late", "concat")]
    assert concat["diff"] == pytest.approx(0.05) and concat["folds_won"] == "2/2"  # (0.02 + 0.08) / 2
    assert concat["diff_train_only"] == pytest.approx(0.10)
    assert concat["diff_text"] == "+5.0 ± 4.2"
    assert versus[0]["diff"] >= versus[-1]["diff"]  # best margin first


def test_verdicts_read_the_margin_against_its_spread():
    assert rt.verdict_of({"diff": 0.05, "diff_std": 0.02}) == "clearly above"
    assert rt.verdict_of({"diff": 0.02, "diff_std": 0.05}) == "above, not clearly"
    assert rt.verdict_of({"diff": -0.01, "diff_std": 0.01}) == "below"


def test_a_model_missing_in_one_fold_is_paired_on_the_others():
    per_fold = [[{"key": "fusion:x", "model": "x", "modalities": "audio+features", "accuracy": 0.7}], []]
    runs = {"train+val": [_scores({"au": .5, "egemaps": .4, "concat": .6, "average": .5}),
                          _scores({"au": .1, "egemaps": .1, "concat": .1, "average": .1})]}
    (concat, average) = sorted(rt.versus_baselines(per_fold, runs), key=lambda v: v["baseline_kind"])[::-1]
    assert concat["baseline_kind"] == "concat" and concat["diff"] == pytest.approx(0.1)
    assert concat["folds_won"] == "1/1" and concat["diff_std"] is None


def test_baseline_rows_carry_both_fits():
    runs = [_scores({"au": .6, "egemaps": .4, "concat": .7, "average": .65}),
            _scores({"au": .5, "egemaps": .5, "concat": .6, "average": .55})]
    train_only = [_scores({"au": .5, "egemaps": .3, "concat": .6, "average": .55})] * 2
    rows = {r["kind_of_baseline"]: r for r in rt.baseline_rows(runs, train_only)}
    assert rows["au"]["accuracy"] == pytest.approx(0.55) and rows["au"]["accuracy_train_only"] == pytest.approx(0.5)
    assert rows["concat"]["reported_accuracy"] == rt.REPORTED_BASELINES["concat"]
    table = rt.markdown_table(list(rows.values()), rt.BASELINE_COLUMNS)
    assert "fit on train actors only" in table and "55.0 ± 7.1" in table


def test_only_fold_outside_the_folds_is_refused_before_training(shared_data, tmp_path):
    with pytest.raises(SystemExit, match="--only-fold"):
        rt.main(["--data", str(shared_data), "--protocol", "actor-cv", "--folds", "4", "--only-fold", "4",
                 "--out", str(tmp_path / "out"), "--markdown", str(tmp_path / "t.md")])
    assert not (tmp_path / "t.md").exists()


def test_the_summary_groups_models_by_verdict_for_each_fit():
    versus = [
        {"model": "a", "baseline": "AUs", "diff": 0.05, "diff_std": 0.01, "diff_text": "+5.0 ± 1.0",
         "diff_train_only": 0.08, "diff_train_only_std": 0.01, "diff_train_only_text": "+8.0 ± 1.0"},
        {"model": "b", "baseline": "eGeMAPS", "diff": -0.02, "diff_std": 0.01, "diff_text": "-2.0 ± 1.0",
         "diff_train_only": 0.01, "diff_train_only_std": 0.03, "diff_train_only_text": "+1.0 ± 3.0"},
    ]
    reported, train_only = rt.versus_summary(versus)
    assert "clearly above: a vs AUs (+5.0 ± 1.0)" in reported and "below: b vs eGeMAPS (-2.0 ± 1.0)" in reported
    assert "training actors only" in train_only and "above, not clearly: b vs eGeMAPS (+1.0 ± 3.0)" in train_only


def test_whisper_baselines_sit_beside_egemaps_and_pair_with_audio_models(ravdess):
    samples, _ = ravdess
    split = rt.actor_folds(samples, 4)[0]
    rng = np.random.default_rng(1)
    audio = {"egemaps": {s.id: rng.normal(size=88) for s in samples},
             "whisper": {s.id: rng.normal(size=768) for s in samples}}
    scores = rt.baseline_scores(samples, split, audio, 8)
    assert set(scores) == {"au", "egemaps", "concat", "average", "whisper", "concat-whisper", "average-whisper"}
    rows = {r["kind_of_baseline"]: r for r in rt.baseline_rows([scores])}
    assert rows["whisper"]["modalities"] == "audio" and rows["concat-whisper"]["modalities"] == "audio+features"
    assert rt.matching_baselines("audio+text", ["egemaps", "whisper"]) == ["egemaps", "whisper"]
    assert rt.matching_baselines("audio+features", ["whisper"]) == ["concat-whisper", "average-whisper"]
