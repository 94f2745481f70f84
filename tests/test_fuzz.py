"""Bad input, fuzzed with hypothesis: run configs, manifests, registry.toml and feature tables.

Whatever the input, the answer is a result or one of emofuse's own errors (a one-line message that
names the thing at fault), never another exception and never a hang. Example counts stay modest so
the file runs in well under a minute.
"""
from __future__ import annotations

import gzip
import math
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from emofuse.core.config import RunConfig, validate
from emofuse.core.data.tables import load_feature_table
from emofuse.core.errors import ConfigError, DataError
from emofuse.core.presets import load_presets, resolve_preset
from emofuse.core.registry import get_registry

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _one_line(exc: BaseException) -> None:
    text = str(exc)
    assert text.strip() and "Traceback" not in text


# -- run configs ---------------------------------------------------------------------------------
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12))
json_like = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)), max_leaves=8)
KNOWN = {
    "name": st.text(max_size=10), "preset": st.one_of(st.none(), st.text(max_size=6)),
    "data": st.fixed_dictionaries({}, optional={
        "dataset": st.text(max_size=8), "split": st.sampled_from(["speaker", "balanced", "given", "x"]),
        "val_fraction": st.floats(-1, 1), "limit": st.one_of(st.none(), st.integers(-5, 50)),
        "options": st.dictionaries(st.text(max_size=6), json_like, max_size=2),
        "on_bad_sample": st.sampled_from(["error", "skip", "ignore"])}),
    "branches": st.dictionaries(st.text(max_size=8), st.one_of(
        json_like, st.fixed_dictionaries({"name": st.text(max_size=8)}, optional={"dim": json_like})), max_size=3),
    "fusion": st.one_of(st.none(), json_like, st.fixed_dictionaries({"name": st.text(max_size=8)})),
    "loss": st.one_of(json_like, st.fixed_dictionaries({"name": st.sampled_from(["focal", "", "cross-entropy"])})),
    "train": st.dictionaries(st.sampled_from(["epochs", "lr", "batch_size", "precision", "seed", "bogus"]),
                             json_like, max_size=4),
    "branch_train": st.dictionaries(st.text(max_size=6), json_like, max_size=2),
    "fusion_train": st.one_of(st.none(), st.dictionaries(st.sampled_from(["epochs", "lr"]), json_like, max_size=2)),
    "search": st.dictionaries(st.text(max_size=8), json_like, max_size=2),
    "output_dir": st.one_of(st.text(max_size=10), st.integers()),
}
run_configs = st.one_of(
    st.fixed_dictionaries({}, optional=KNOWN),
    st.dictionaries(st.text(max_size=10), json_like, max_size=4),
)


@FUZZ
@given(run_configs)
def test_any_run_config_dict_validates_or_fails_with_a_config_error(raw):
    try:
        config = validate(raw, source="fuzz.toml")
    except ConfigError as exc:
        _one_line(exc)
        assert str(exc).startswith("fuzz.toml")
        return
    assert isinstance(config, RunConfig)


# -- manifests -----------------------------------------------------------------------------------
cells = st.one_of(st.text(max_size=8), st.sampled_from(["happy", "sad", "", "nan", "inf", "-1", "1e400", '"', "a,b"]))
columns = st.lists(st.sampled_from(["id", "label", "speaker", "age", "text", "audio", "utterance", "au_0", "au_1",
                                    "x"]), min_size=0, max_size=6)


@st.composite
def manifest_csv(draw) -> str:
    header = draw(columns)
    rows = draw(st.lists(st.lists(cells, min_size=0, max_size=len(header) + 1), max_size=5))
    text = "\n".join([",".join(header)] + [",".join(r) for r in rows])
    return draw(st.one_of(st.just(text), st.text(max_size=80), st.just(text[: draw(st.integers(0, len(text)))])))


@st.composite
def manifest_jsonl(draw) -> str:
    rows = draw(st.lists(st.one_of(json_like, st.fixed_dictionaries(
        {"id": st.one_of(st.text(max_size=5), st.integers())},
        optional={"label": cells, "age": json_like, "text": json_like, "au": st.lists(st.floats(), max_size=3)})),
        max_size=4))
    import json
    text = "\n".join(json.dumps(r) for r in rows)
    return draw(st.one_of(st.just(text), st.just(text[: draw(st.integers(0, len(text)))]), st.text(max_size=60)))


def _read_manifest(folder: Path, name: str, content: bytes, on_bad_sample: str, feature_sets: dict) -> list:
    (folder / name).write_bytes(content)
    cls = get_registry().cls("dataset", "manifest")
    config = cls.make_config({"path": name, "labels": ["happy", "sad"], "feature_sets": feature_sets,
                              "empty_text": "absent"}, where="data.options")
    reader = cls(config, data_dir=folder)
    reader.on_bad_sample = on_bad_sample
    samples = list(reader.samples())
    for s in samples:
        assert s.id and (s.label in (None, 0, 1))
        for vec in s.features.values():
            assert all(math.isfinite(float(v)) for v in vec)
    return samples


@FUZZ
@given(st.one_of(manifest_csv().map(lambda t: ("m.csv", t.encode())),
                 manifest_jsonl().map(lambda t: ("m.jsonl", t.encode())),
                 st.binary(max_size=60).map(lambda b: ("m.csv", b)),
                 st.binary(max_size=60).map(lambda b: ("m.csv.gz", b)),
                 manifest_csv().map(lambda t: ("m.csv.gz", gzip.compress(t.encode())[: max(1, len(t) // 2)]))),
       st.sampled_from(["error", "skip"]), st.sampled_from([{}, {"au": "au_"}]))
def test_any_manifest_gives_samples_or_a_data_error(named, on_bad_sample, feature_sets):
    name, content = named
    with tempfile.TemporaryDirectory() as tmp:
        try:
            _read_manifest(Path(tmp), name, content, on_bad_sample, feature_sets)
        except (DataError, ConfigError) as exc:
            _one_line(exc)


# -- registry.toml -------------------------------------------------------------------------------
toml_values = st.one_of(st.integers(-5, 5).map(str), st.sampled_from(['"x"', "true", "[1, 2]", '["a"]', "{a = 1}",
                                                                       '"focal"', "1e-3", "nan", "inf", '"p1"',
                                                                       '[["p1"]]', '["p2", 3]']))


@st.composite
def registry_toml(draw) -> str:
    lines = []
    for _ in range(draw(st.integers(0, 4))):
        table = draw(st.sampled_from(["presets.p1", "presets.p2", "presets.p1.train", "presets", "other", "presets.p2.loss"]))
        lines.append(f"[{table}]")
        for _ in range(draw(st.integers(0, 3))):
            key = draw(st.sampled_from(["extends", "description", "name", "epochs", "p1", "branches"]))
            lines.append(f"{key} = {draw(toml_values)}")
    text = "\n".join(lines)
    return draw(st.one_of(st.just(text), st.text(max_size=60), st.just(text[: draw(st.integers(0, len(text)))])))


@FUZZ
@given(st.one_of(registry_toml().map(str.encode), st.binary(max_size=40)))
def test_any_registry_toml_gives_presets_or_a_config_error(content):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "registry.toml"
        path.write_bytes(content)
        try:
            presets = load_presets(path)
        except ConfigError as exc:
            _one_line(exc)
            return
        assert isinstance(presets, dict)
        for name in presets:
            try:
                resolved = resolve_preset(name, presets)
            except ConfigError as exc:
                _one_line(exc)
                continue
            assert isinstance(resolved, dict) and "extends" not in resolved


# -- feature tables with NaN / inf ---------------------------------------------------------------
@pytest.fixture(scope="module")
def real_rows(shared_data) -> list[str]:
    with gzip.open(shared_data / "ravdess-au-mfcc.csv.gz", "rt", encoding="utf-8") as fh:
        return [next(fh).rstrip("\n") for _ in range(9)]  # header + 8 real clips


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 7), st.integers(1, 60), st.sampled_from(["nan", "inf", "-inf", "NaN",
                                                                                     "Infinity", "", "1e999", "x"])),
                min_size=1, max_size=6))
def test_non_finite_feature_values_are_a_clear_error_or_a_counted_skip(real_rows, damage):
    header, rows = real_rows[0], [r.split(",") for r in real_rows[1:]]
    for row, col, value in damage:
        rows[row][col] = value
    bad_rows = {row for row, _, _ in damage}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "features.csv"
        path.write_text("\n".join([header] + [",".join(r) for r in rows]) + "\n")
        skipped: list[tuple[str, str]] = []
        table = load_feature_table(path, id_column="clip_id", feature_sets={"au": "au_"}, key_pattern=r"^\d\d-(.+)$",
                                   on_bad_row=lambda where, why: skipped.append((where, why)))
        au_damage = {row for row, col, _ in damage if col <= 35}
        assert len(table) + len(skipped) == 8 and len(skipped) == len(au_damage)
        assert {int(where.rsplit(":", 1)[1]) - 2 for where, _ in skipped} == au_damage
        assert all("not a number" in why or "non-finite" in why for _, why in skipped)
        for feats in table.values():
            assert all(math.isfinite(v) for v in feats["au"].tolist())

        def fail(where: str, why: str) -> None:
            raise DataError(where, why, hint="fix the row")

        if au_damage:
            with pytest.raises(DataError, match=r"features\.csv:\d+: feature set 'au'") as info:
                load_feature_table(path, id_column="clip_id", feature_sets={"au": "au_"},
                                   key_pattern=r"^\d\d-(.+)$", on_bad_row=fail)
            _one_line(info.value)
        del bad_rows
