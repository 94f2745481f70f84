"""The MELD presets and the MELD experiment configs beside bench_meld.py (`benchmarks/configs/*.toml`, each a
`--config` file on a preset): a nested inner encoder, MELD's whole train partition to fit (no test split carved
out), no speaker-metadata modality asked of a corpus without one, and the per-epoch step cap that fine-tuning
within a CPU budget uses."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from emofuse.cli.app import app
from emofuse.core.config import ComponentRef
from emofuse.core.data.cache import FeatureCache
from emofuse.core.data.pipeline import load_data, make_batch
from emofuse.core.engine.branch_stage import BranchTask
from emofuse.core.engine.compose import ComposedModel, build_encoder, required_modalities
from emofuse.core.engine.distributed import DistContext
from emofuse.core.presets import compose_config, load_presets
from emofuse.core.types import METADATA, TEXT

runner = CliRunner()
MELD_PRESETS = sorted(name for name in load_presets() if name.startswith("meld-"))
CONFIGS = Path(__file__).resolve().parents[1] / "benchmarks" / "configs"
MELD_CONFIGS = sorted(path.stem for path in CONFIGS.glob("meld-*.toml"))


def experiment(name: str, sets=()):
    """An experiment config from benchmarks/configs, composed as `emofuse train --config FILE` composes it."""
    return compose_config(config_file=CONFIGS / f"{name}.toml", sets=list(sets))


def test_dry_run_shows_the_nested_text_encoder_and_the_balanced_loss():
    result = runner.invoke(app, ["train", "--config", str(CONFIGS / "meld-finetune-context.toml"), "--dry-run"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert '[branches.text]\nname = "dialogue-context"\ndirection = "bidirectional"' in out
    assert '[branches.text.inner]\nname = "text-classifier"\n' in out and "audio_backbone" not in out
    assert "freeze_backbone = false" in out and "max_text_tokens = 32" in out
    assert 'class_weights = "balanced"' in out and "test_fraction = 0.0" in out


def test_the_registry_keeps_the_meld_presets_a_user_picks_and_the_experiments_live_beside_the_benchmark():
    assert MELD_PRESETS == ["meld-context", "meld-finetune", "meld-finetune-mpnet", "meld-text"]
    assert {"meld-finetune-mpnet-adjusted", "meld-finetune-mpnet-named", "meld-finetune-mpnet-onelr",
            "meld-finetune-mpnet-turns", "meld-finetune-mpnet-linear", "meld-finetune-turns",
            "meld-finetune-context"} == set(MELD_CONFIGS)
    assert not set(MELD_CONFIGS) & set(load_presets())


@pytest.mark.parametrize("preset", MELD_PRESETS)
def test_meld_presets_read_text_only(preset):
    assert required_modalities(compose_config(preset=preset)) == {TEXT}


@pytest.mark.parametrize("name", MELD_CONFIGS)
def test_meld_experiment_configs_compose_read_text_only_and_keep_their_name(name):
    config = experiment(name)
    assert required_modalities(config) == {TEXT} and config.name == name


def test_named_preset_reads_speaker_lines_with_a_pooled_head_and_the_adjusted_loss():
    config = experiment("meld-finetune-mpnet-named")
    inner = config.branches["text"].options["inner"]
    assert inner["name_speaker"] is True and inner["sequence_model"] == "none" and inner["max_text_tokens"] == 64
    assert inner["text_backbone"] == "mpnet" and inner["freeze_backbone"] is False
    assert config.loss.options["logit_adjustment"] == 1.0 and config.train.batch_size == 16


def test_onelr_preset_trains_mpnet_and_its_pooled_head_at_one_lr():
    config = experiment("meld-finetune-mpnet-onelr")
    inner = config.branches["text"].options["inner"]
    assert inner["text_backbone"] == "mpnet" and inner["freeze_backbone"] is False
    assert inner["sequence_model"] == "none" and inner["backbone_lr_scale"] == 1.0
    assert config.train.lr == 3e-5 and config.train.batch_size == 16
    assert config.loss.name == "cross-entropy" and not config.loss.options.get("logit_adjustment")


def test_linear_preset_is_the_plain_sentence_classifier_without_the_context_wrapper():
    config = experiment("meld-finetune-mpnet-linear")
    text = config.branches["text"]
    assert text.name == "text-classifier" and "inner" not in text.options
    assert text.options["head"] == "linear" and text.options["sequence_model"] == "none"
    assert text.options["text_backbone"] == "mpnet" and text.options["freeze_backbone"] is False
    assert text.options["backbone_lr_scale"] == 1.0 and text.options["max_text_tokens"] == 32
    assert (config.train.lr, config.train.weight_decay, config.train.batch_size, config.train.epochs) == (3e-5, 0.01, 16, 2)
    assert config.train.steps_per_epoch is None and not config.train.group_by_length


def test_mpnet_turns_preset_reads_past_turns_under_the_adjusted_loss():
    config = experiment("meld-finetune-mpnet-turns")
    inner = config.branches["text"].options["inner"]
    assert inner["text_backbone"] == "mpnet" and inner["context_past_turns"] == 3 and inner["context_tokens"] == 64
    assert config.loss.options["logit_adjustment"] == 1.0


def test_meld_loads_whole_train_partition_without_a_metadata_warning(shared_data, caplog):
    config = compose_config(preset="meld-text", sets=[f'data.data_dir="{shared_data}"'])
    with caplog.at_level(logging.WARNING):
        bundle = load_data(config.data, required_modalities(config))
    assert not [r for r in caplog.records if "modality" in r.getMessage()]
    assert bundle.splits["test"] == []
    assert {s.extra["partition"] for s in bundle.splits["train"]} == {"train"}
    assert {s.extra["partition"] for s in bundle.splits["val"]} == {"dev"}
    # the warning is still there for a branch that does read metadata
    with caplog.at_level(logging.WARNING):
        load_data(config.data, {TEXT, METADATA})
    assert any("metadata modality" in r.getMessage() for r in caplog.records)


@pytest.fixture(scope="module")
def meld_small(shared_data):
    config = compose_config(preset="meld-context", sets=[f'data.data_dir="{shared_data}"', "data.limit=120",
                                                         "train.steps_per_epoch=2", "train.batch_size=8"])
    return config, load_data(config.data, required_modalities(config))


def test_text_branch_without_metadata_trains_on_meld(meld_small):
    config, bundle = meld_small
    torch.manual_seed(0)
    encoder = build_encoder(config.branches["text"], bundle.num_classes, where="branches.text")
    assert tuple(encoder.modalities) == (TEXT,) and encoder.inner.metadata is None
    with_metadata = build_encoder(ComponentRef(name="text-classifier", metadata=True), bundle.num_classes,
                                  where="branches.text")
    assert METADATA in with_metadata.modalities
    batch = make_batch(bundle.splits["train"][:6], {TEXT}, bundle.normalizer)
    out = encoder.train()(batch)
    assert out.logits.shape == (6, bundle.num_classes)
    torch.nn.functional.cross_entropy(out.logits, batch.labels).backward()
    assert encoder.inner.head[0].weight.grad is not None


def test_steps_per_epoch_caps_a_branch_epoch(meld_small, tmp_path):
    config, bundle = meld_small
    encoder = build_encoder(config.branches["text"], bundle.num_classes, where="branches.text")
    task = BranchTask(ComposedModel({"text": encoder}), bundle, FeatureCache(tmp_path), config.train, DistContext())
    whole = task._num_whole_epoch_batches()
    assert whole > 2 and task.num_train_batches() == 2
    assert len(list(task.train_batches(0))) == 2
    uncapped = config.train.model_copy(update={"steps_per_epoch": None})
    free = BranchTask(ComposedModel({"text": encoder}), bundle, FeatureCache(tmp_path), uncapped, DistContext())
    assert free.num_train_batches() == whole == len(list(free.train_batches(0)))


def test_finetune_turns_trains_on_whole_dialogues_without_a_cache(shared_data, tmp_path):
    config = experiment("meld-finetune-turns", sets=[f'data.data_dir="{shared_data}"', "data.limit=60",
                                                     "train.steps_per_epoch=1", "train.batch_size=16"])
    bundle = load_data(config.data, required_modalities(config))
    encoder = build_encoder(config.branches["text"], bundle.num_classes, where="branches.text")
    assert encoder.batches_by_dialogue and not encoder.cacheable
    task = BranchTask(ComposedModel({"text": encoder}), bundle, FeatureCache(tmp_path), config.train, DistContext())
    batch = next(iter(task.train_batches(0)))
    by_dialogue: dict[str, int] = {}
    for s in bundle.splits["train"]:
        by_dialogue[s.dialogue_id] = by_dialogue.get(s.dialogue_id, 0) + 1
    for dialogue in set(batch.dialogue_ids):
        assert batch.dialogue_ids.count(dialogue) == by_dialogue[dialogue], "a dialogue was cut"
    prepared, extracted = task.prepare(batch)
    assert extracted is None  # tokens come from MiniLM at every step: it reads the turns and trains
    out = encoder.train()(prepared)
    torch.nn.functional.cross_entropy(out.logits, prepared.labels).backward()
    assert encoder.inner.text_backbone.model.embeddings.word_embeddings.weight.grad is not None


def test_group_by_length_batches_utterances_of_similar_length(shared_data, tmp_path):
    config = compose_config(preset="meld-text", sets=[f'data.data_dir="{shared_data}"', "data.limit=120",
                                                      "train.batch_size=8"])
    bundle = load_data(config.data, required_modalities(config))
    encoder = build_encoder(config.branches["text"], bundle.num_classes, where="branches.text")

    def padded_characters(train) -> int:
        task = BranchTask(ComposedModel({"text": encoder}), bundle, FeatureCache(tmp_path), train, DistContext())
        batches = list(task.train_batches(0))
        assert sum(len(b) for b in batches) == len(bundle.splits["train"])
        assert len(batches) == task.num_train_batches()
        return sum(max(len(t) for t in b.text) * len(b) for b in batches)

    grouped = config.train.model_copy(update={"group_by_length": True})
    assert padded_characters(grouped) < 0.7 * padded_characters(config.train)
