"""Joins a per-clip feature table (action units, eGeMAPS, any precomputed vectors) to another corpus.

The wrapped reader (``base``, with ``base_options``) yields the clips; each clip's row in the
table is found by its id (or the first group of ``sample_key_pattern`` on the id) matched against
the table's id column (or the first group of ``key_pattern`` on it), and the columns picked by
``feature_sets`` (name -> column prefix) become ``Sample.features[name]``. A clip with no row
simply lacks those features (its presence flag is False); ``require_all = true`` makes that an error.
The defaults join the shared RAVDESS action-unit + MFCC table to the RAVDESS speech clips.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, ClassVar, Iterator

from emofuse.core import (
    MODALITIES,
    ConfigError,
    CorpusReader,
    CorpusReaderConfig,
    DataError,
    Sample,
    hookimpl,
    load_feature_table,
)

log = logging.getLogger("emofuse.data")


class FeatureTableConfig(CorpusReaderConfig):
    #: The corpus whose clips get the features: a registered dataset name and its options.
    base: str = "ravdess"
    base_options: dict[str, Any] = {"feature_table": None}
    #: The table (CSV/TSV/JSONL, optionally gzipped), relative to the data folder or the base root.
    table: Path = Path("ravdess-au-mfcc.csv.gz")
    id_column: str = "clip_id"
    #: Regex on the table's ids whose first group is the join key (None: the whole id).
    key_pattern: str | None = r"^\d\d-(.+)$"
    #: Regex on sample ids whose first group is the join key (None: the whole id).
    sample_key_pattern: str | None = None
    feature_sets: dict[str, str] = {"au": "au_", "mfcc": "mfcc_"}
    #: True: a clip without a row is bad input; False: it just lacks these features.
    require_all: bool = False


class FeatureTableReader(CorpusReader):
    """Another corpus' clips plus per-clip feature vectors joined from a table, as the `features` modality."""

    name: ClassVar[str] = "feature-table"
    Config: ClassVar[type[FeatureTableConfig]] = FeatureTableConfig
    modalities: ClassVar[tuple[str, ...]] = MODALITIES
    default_root: ClassVar[str] = ""

    def __init__(self, config: FeatureTableConfig, data_dir: Path | None = None):
        from emofuse.core import get_registry

        cls = get_registry().cls("dataset", config.base)
        if cls is type(self):
            raise ConfigError("data.options.base: a feature table cannot wrap itself")
        options = dict(config.base_options)
        for key in ("labels", "label_map"):  # one label set for the whole dataset
            if key in config.model_fields_set:
                options[key] = getattr(config, key)
        base_cfg = cls.make_config(options, where=f"data.options.base_options[{config.base}]")
        self.base = cls(base_cfg, data_dir=data_dir)
        # Labels are the base reader's business; this reader only joins features.
        super().__init__(config.model_copy(update={"labels": list(self.base.label_names), "label_map": {}}), data_dir)

    def samples(self) -> Iterator[Sample]:
        cfg: FeatureTableConfig = self.config  # type: ignore[assignment]
        for attr in ("on_bad_sample",):
            if hasattr(self.base, attr):
                setattr(self.base, attr, getattr(self, attr))
        bases = [Path(self.data_dir)] if self.data_dir else []
        try:
            bases.append(self.base.root)
        except ValueError:
            pass
        path = self.resolve(cfg.table, *bases, Path.cwd())
        if path is None or not path.is_file():
            raise DataError(path or cfg.table, "feature table not found", hint="fix data.options.table")
        table = load_feature_table(path, id_column=cfg.id_column, feature_sets=cfg.feature_sets,
                                   key_pattern=cfg.key_pattern, on_bad_row=self.bad)
        sample_regex = re.compile(cfg.sample_key_pattern) if cfg.sample_key_pattern else None
        joined = total = 0
        for sample in self.base.samples():
            total += 1
            key = sample.id
            if sample_regex is not None:
                m = sample_regex.search(sample.id)
                key = (m.group(1) if m.groups() else m.group(0)) if m else None
            feats = table.get(key) if key is not None else None
            if feats is None and cfg.require_all:
                self.bad(sample.source or sample.id, f"clip {sample.id!r} has no row in {path}")
                continue
            if feats:
                clash = sorted(set(feats) & set(sample.features))
                if clash:
                    raise ConfigError(
                        f"data.options.feature_sets: {', '.join(clash)} already come from the {cfg.base} reader",
                        hint="rename the feature sets, or turn off the base reader's own table",
                    )
                sample.features = {**sample.features, **feats}
                joined += 1
            yield sample
        self.skipped.extend(getattr(self.base, "skipped", []))
        self.excluded.update(getattr(self.base, "excluded", {}))
        log.info("feature-table: joined %s to %d of %d clips", ", ".join(cfg.feature_sets), joined, total)


@hookimpl
def register_datasets():
    return [FeatureTableReader]
