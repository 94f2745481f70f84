"""Multi-task heads (an auxiliary label beside emotion) and backbone learning-rate groups for fine-tuning."""
from __future__ import annotations

import pytest
import torch

from emofuse.core.engine.compose import ComposedModel, build_encoder
from emofuse.core.config import ComponentRef, DataConfig
from emofuse.core.data.dialogue import dialogue_loader
from emofuse.core.data.pipeline import load_data
from emofuse.core.errors import ConfigError
from emofuse.core.interfaces import collate_extracted
from emofuse.core.engine.branch_stage import auxiliary_loss
from emofuse.core.engine.fit import parameter_groups
from emofuse.core.types import TEXT
from emofuse.plugins.encoders.auxiliary import AuxTaskConfig, auxiliary_labels

SENTIMENT = {"field": "sentiment", "classes": ["negative", "neutral", "positive"], "weight": 0.5}


@pytest.fixture(scope="module")
def meld_batch(shared_data):
    bundle = load_data(DataConfig(dataset="meld", data_dir=shared_data), {TEXT})
    batch = next(iter(dialogue_loader(bundle, "val", max_utterances=48, shuffle=False, seed=0, modalities={TEXT})))
    return bundle, batch


def test_sentiment_labels_come_from_the_reader(meld_batch):
    bundle, batch = meld_batch
    by_id = {s.id: s for s in bundle.splits["val"]}
    labels = auxiliary_labels(batch, AuxTaskConfig(**SENTIMENT))
    expected = [SENTIMENT["classes"].index(by_id[i].extra["sentiment"].lower()) for i in batch.ids]
    assert labels.tolist() == expected
    unknown = auxiliary_labels(batch, AuxTaskConfig(field="no_such_field", classes=["a", "b"]))
    assert (unknown == -1).all()


def test_speaker_sex_labels_come_from_gender(batch_factory):
    batch = batch_factory(4)  # genders 1, 2, 1, 2 (male, female)
    batch.gender[3] = 0
    labels = auxiliary_labels(batch, AuxTaskConfig(field="gender", classes=["male", "female"]))
    assert labels.tolist() == [0, 1, 0, -1]


def test_aux_head_learns_and_its_loss_is_separate(meld_batch):
    _, batch = meld_batch
    torch.manual_seed(0)
    enc = build_encoder(ComponentRef(name="dialogue-context", inner={"name": "mm-lstm"}, aux_task=SENTIMENT), 7,
                        where="branches.text")
    assert enc.aux_weight == 0.5
    extracted = collate_extracted(enc.extract(batch))
    out = enc(batch, extracted)
    assert out.extras["aux_logits"].shape == (len(batch), 3)
    ce, weight = auxiliary_loss(out, enc)
    assert weight == 0.5 and ce.item() > 0
    opt = torch.optim.AdamW([p for p in enc.parameters() if p.requires_grad], lr=3e-3)
    first = ce.item()
    for _ in range(15):
        out = enc(batch, extracted)
        ce, _ = auxiliary_loss(out, enc)
        opt.zero_grad()
        ce.backward()
        opt.step()
    assert auxiliary_loss(enc(batch, extracted), enc)[0].item() < 0.7 * first
    plain = build_encoder(ComponentRef(name="dialogue-context", inner={"name": "mm-lstm"}), 7, where="x")
    assert auxiliary_loss(plain(batch, extracted), plain) is None


def test_aux_task_options_are_checked():
    with pytest.raises(ConfigError, match="distinct"):
        build_encoder(ComponentRef(name="dialogue-context", aux_task={"field": "sentiment", "classes": ["a", "A"]}),
                      7, where="branches.text")


def test_unfrozen_backbone_gets_its_own_smaller_learning_rate():
    enc = build_encoder(ComponentRef(name="dialogue-context", inner={"name": "mm-lstm", "freeze_backbone": False}),
                        7, where="branches.text")
    model = ComposedModel({"text": enc})
    scale = getattr(enc.inner, "backbone_lr_scale", None)
    if scale is None or scale == 1.0:
        # mm-lstm without a backbone_lr_scale option: everything trains at one rate
        assert len(parameter_groups(model, 1e-3)) == 1
        return
    groups = parameter_groups(model, 1e-3)
    assert [g["lr"] for g in groups] == [1e-3, pytest.approx(1e-3 * scale)]
    backbone = {id(p) for p in enc.inner.text_backbone.parameters()}
    assert {id(p) for p in groups[1]["params"]} >= backbone
    assert not backbone & {id(p) for p in groups[0]["params"]}


def test_trainer_batches_by_dialogue_and_logs_the_aux_loss(shared_data, tmp_path):
    """train_run on a real RAVDESS slice (AU features, intensity as the auxiliary label): the context
    branch trains through the dialogue batcher (each clip its own dialogue) and the history carries
    the auxiliary loss beside the emotion loss."""
    import json

    from emofuse.core.config import validate
    from emofuse.core.engine.training import train_run

    config = validate({
        "name": "ctx", "output_dir": str(tmp_path),
        "data": {"dataset": "ravdess", "data_dir": str(shared_data), "limit": 200},
        "branches": {"video": {"name": "dialogue-context", "inner": {"name": "features", "features": ["au"]},
                               "aux_task": {"field": "intensity", "classes": ["normal", "strong"], "weight": 0.3}}},
        "train": {"epochs": 2, "batch_size": 32, "device": "cpu"},
    })
    result = train_run(config, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "ctx" / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(r["train_aux_loss"] > 0 and r["train_loss"] > 0 for r in rows)
    assert len(rows) == 2 and result is not None
    # validation reports the auxiliary head apart from the emotion metrics it never enters
    assert all(r["val_aux_loss"] > 0 and 0 <= r["val_aux_accuracy"] <= 1 for r in rows)
    assert 0 <= result.metrics["test"]["aux_accuracy"] <= 1 and result.metrics["test"]["accuracy"] >= 0
