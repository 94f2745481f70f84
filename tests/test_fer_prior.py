"""The FER-2013 prior: labels mapped by name, MIMAMO started from it equal to the zero-shot classifier
on real CREMA-D faces, learning from there, and the zero-shot scores per clip and per frame."""
from __future__ import annotations

import pytest
import torch

from emofuse.core.apps.zero_shot import evaluate_zero_shot, zero_shot_config, zero_shot_model
from emofuse.core.config import DataConfig
from emofuse.core.data.pipeline import make_batch
from emofuse.core.data.preprocess import preprocess_spec
from emofuse.core.engine.compose import build_reader
from emofuse.core.errors import ConfigError
from emofuse.core.types import VIDEO
from emofuse.plugins.encoders.fer_prior import fer_label_map, map_fer_probabilities
from emofuse.plugins.encoders.fer_xception import FER_LABELS
from emofuse.plugins.encoders.mimamo import MimamoEncoder

CREMA = ["neutral", "happy", "sad", "angry", "fearful", "disgust"]


def test_labels_map_onto_fer_expressions_by_name():
    assert [FER_LABELS[i] for i in fer_label_map(CREMA)] == ["neutral", "happy", "sad", "angry", "fear", "disgust"]
    meld = ["neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear"]
    assert [FER_LABELS[i] for i in fer_label_map(meld)] == ["neutral", "happy", "surprise", "angry", "sad", "disgust", "fear"]
    ravdess = ["neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised"]
    assert fer_label_map(ravdess)[1] is None  # calm has no FER-2013 counterpart
    with pytest.raises(ConfigError, match="none of them names a FER-2013 expression"):
        fer_label_map(["positive", "negative"])
    with pytest.raises(ConfigError, match="same FER-2013 expression"):
        fer_label_map(["joy", "happy"])
    fer = torch.tensor([[0.1, 0.1, 0.1, 0.4, 0.1, 0.1, 0.1]])
    mapped = map_fer_probabilities(fer, fer_label_map(ravdess))
    assert mapped.sum().item() == pytest.approx(1.0) and mapped[0, 1] == 0  # calm gets nothing


@pytest.fixture(scope="module")
def crema(shared_data):
    data = DataConfig(dataset="crema-d", data_dir=shared_data)
    reader = build_reader(data)
    samples = [s for s in reader.samples() if s.has(VIDEO)]
    assert len(samples) == 6 and reader.label_names == CREMA
    return data, samples


@pytest.fixture(scope="module")
def crema_batch(crema):
    data, samples = crema
    return make_batch(samples, {VIDEO}, None, spec=preprocess_spec(data))


def test_mimamo_started_from_the_prior_is_the_zero_shot_fer_classifier(crema_batch):
    torch.manual_seed(0)
    encoder = MimamoEncoder(MimamoEncoder.make_config({"prior_labels": CREMA, "text_backbone": None}), len(CREMA)).eval()
    with torch.no_grad():
        out = encoder(crema_batch)
        # independently: the FER network's own probabilities on the same face crops, averaged over frames
        frames = crema_batch.video.flatten(0, 1)
        fer = encoder.frame_backbone.expression_probabilities(frames).view(6, 8, 7)
    expected = map_fer_probabilities(fer, fer_label_map(CREMA)).mean(dim=1)
    torch.testing.assert_close(out.logits.softmax(-1), expected.clamp_min(1e-4) / expected.clamp_min(1e-4).sum(-1, keepdim=True),
                               atol=1e-4, rtol=1e-3)
    assert out.extras["prior_frame_probabilities"].shape == (6, 8, 6)


def test_the_prior_started_head_learns_from_there(crema_batch):
    torch.manual_seed(0)
    encoder = MimamoEncoder(MimamoEncoder.make_config({"prior_labels": CREMA, "text_backbone": None}), len(CREMA))
    extracted = encoder.extracted_for(crema_batch, None)
    optimiser = torch.optim.Adam([p for p in encoder.parameters() if p.requires_grad], lr=1e-2)
    encoder.train()
    losses = []
    for _ in range(5):
        loss = torch.nn.functional.cross_entropy(encoder(crema_batch, extracted).logits, crema_batch.labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert encoder.classifier.weight.abs().sum() > 0 and encoder.prior_weight.item() != 1.0


def test_a_prior_needs_the_fer_backbone_and_the_data_sets_class_count():
    with pytest.raises(ConfigError, match="prior_labels names 2 labels, the data set has 6"):
        MimamoEncoder(MimamoEncoder.make_config({"prior_labels": ["happy", "sad"], "text_backbone": None}), 6)
    config = MimamoEncoder.make_config({"prior_labels": CREMA, "text_backbone": None, "frame_backbone": "resnet18",
                                        "frame_pretrained": False})
    with pytest.raises(ConfigError, match="needs frame_backbone"):
        MimamoEncoder(config, 6)


def test_zero_shot_scores_every_clip_and_sampled_frame_of_the_real_clips(crema):
    data, samples = crema
    config = zero_shot_config(CREMA, data)
    report = evaluate_zero_shot(zero_shot_model(config, len(CREMA)), samples, CREMA, config)
    assert len(report.clip_ids) == 6 and len(report.frame_labels) == 48 and not report.without_face
    assert report.clip_accuracy == sum(r["label"] == r["predicted"] for r in report.to_dict()["per_clip"]) / 6
    assert 0.0 <= report.frame_accuracy <= 1.0
