"""The fusions: formulas, parameter counts, presence handling, any number of branches, reports."""
from __future__ import annotations

import pytest
import torch

from emofuse.core.config import ComponentRef
from emofuse.core.engine.compose import build_fusion
from emofuse.core.errors import ConfigError
from emofuse.core.interfaces import BranchInfo
from emofuse.core.types import EncoderOutput
from emofuse.plugins.fusions.attention import AttentionFusion
from emofuse.plugins.fusions.feature_level import FeatureLevelFusion
from emofuse.plugins.fusions.late import EnhancedLateFusion, WeightedLateFusion

C = 7
FUSIONS = ["weighted-late", "enhanced-late", "attention", "feature-level"]


NAMES = ["video", "audio_text", "meta", "extra", "fifth"]


def infos(n: int, emb: int = 16) -> list[BranchInfo]:
    return [BranchInfo(NAMES[i], C, emb if i % 2 == 0 else 0, ("video",)) for i in range(n)]


class Outputs(dict):
    """Branch outputs by name (what a fusion takes); ``outs[i]`` is the i-th branch's, for brevity."""

    def __getitem__(self, key):
        return super().__getitem__(NAMES[key] if isinstance(key, int) else key)


def outputs(n: int, b: int = 6, seed: int = 0, absent: dict[int, list[int]] | None = None, emb: int = 16):
    g = torch.Generator().manual_seed(seed)
    outs = Outputs()
    for i in range(n):
        present = torch.ones(b, dtype=torch.bool)
        for j in (absent or {}).get(i, []):
            present[j] = False
        embedding = torch.randn(b, emb, generator=g) if i % 2 == 0 else None
        outs[NAMES[i]] = EncoderOutput(torch.randn(b, C, generator=g) * 2, embedding, present)
    return outs


def make(name: str, n: int, **options):
    return build_fusion(ComponentRef(name=name, **options), C, infos(n))


def test_weighted_late_is_the_reference_formula():
    fusion = make("weighted-late", 2, init_weights=[0.7, 0.2])
    outs = outputs(2)
    torch.testing.assert_close(fusion(outs), 0.7 * outs[0].logits + 0.2 * outs[1].logits)
    assert sum(p.numel() for p in fusion.trainable_parameters()) == 2
    rep = fusion.report()
    assert rep["weights"] == pytest.approx({"video": 0.7 / 0.9, "audio_text": 0.2 / 0.9})
    assert rep["raw_weights"] == pytest.approx({"video": 0.7, "audio_text": 0.2})


def test_enhanced_late_has_nine_parameters_for_two_branches_and_seven_classes():
    fusion = make("enhanced-late", 2)
    assert sum(p.numel() for p in fusion.trainable_parameters()) == 9
    with torch.no_grad():
        fusion.class_bias.copy_(torch.arange(C, dtype=torch.float32))
    outs = outputs(2)
    want = 0.5 * outs[0].logits + 0.5 * outs[1].logits + torch.arange(C, dtype=torch.float32)
    torch.testing.assert_close(fusion(outs), want)
    assert fusion.report()["class_bias"] == list(range(C))


def test_absent_branch_contributes_nothing_and_weights_renormalise():
    fusion = make("weighted-late", 2, init_weights=[0.6, 0.3])
    outs = outputs(2, absent={0: [1, 3]})
    outs[0].logits[1] = float("nan")  # whatever an absent branch returns must not leak
    out = fusion(outs)
    full = 0.6 * outs[0].logits[0] + 0.3 * outs[1].logits[0]
    torch.testing.assert_close(out[0], full)
    # sample 1 sees only the audio branch, rescaled to the full weight total 0.9
    torch.testing.assert_close(out[1], 0.9 * outs[1].logits[1])
    assert torch.isfinite(out).all()
    # no branch at all: the enhanced fusion falls back to its class bias
    enhanced = make("enhanced-late", 2)
    none = outputs(2, absent={0: [2], 1: [2]})
    torch.testing.assert_close(enhanced(none)[2], enhanced.class_bias.detach())


def test_gradient_of_the_rescaling_is_zero_when_every_branch_is_present():
    fusion = make("weighted-late", 2, init_weights=[0.6, 0.3])
    outs = outputs(2)
    fusion(outs).sum().backward()
    want = torch.stack([outs[0].logits.sum(), outs[1].logits.sum()])
    torch.testing.assert_close(fusion.weights.grad, want)


@pytest.mark.parametrize("name", FUSIONS)
@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_every_fusion_takes_any_number_of_branches_and_learns(name, n):
    torch.manual_seed(0)
    fusion = make(name, n)
    outs = outputs(n, b=32, absent={0: [0, 1]} if n > 1 else None)
    labels = torch.randint(0, C, (32,))
    logits = fusion(outs)
    assert logits.shape == (32, C) and torch.isfinite(logits).all()
    params = list(fusion.trainable_parameters())
    assert params and all(p.requires_grad for p in params)
    opt = torch.optim.Adam(params, lr=0.05)
    first = None
    for _ in range(60):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(fusion(outs), labels)
        first = loss.item() if first is None else first
        loss.backward()
        opt.step()
    assert loss.item() < first  # it fits something
    rep = fusion.report()
    import json

    json.dumps(rep)  # plain JSON values only
    with pytest.raises(ValueError, match="branches"):
        fusion({**outs, "intruder": outputs(1)[0]})


def test_attention_weighs_per_sample_and_masks_absent_branches():
    fusion = make("attention", 3)
    outs = outputs(3, b=4, absent={1: [0], 2: [0, 1]})
    weights, _ = fusion.branch_weights(outs)
    torch.testing.assert_close(weights.sum(1), torch.ones(4))
    assert weights[0].tolist() == [1.0, 0.0, 0.0]  # only branch 0 present
    assert weights[1, 2] == 0 and weights[1, :2].tolist() == pytest.approx([0.5, 0.5])  # zero-init gate: average
    # after training on data where branch 0 is right for some samples and branch 1 for others,
    # the weights differ between samples
    torch.manual_seed(0)
    b = 256
    labels = torch.randint(0, C, (b,))
    good = torch.nn.functional.one_hot(labels, C).float() * 4
    noise = torch.randn(2, b, C)
    first_right = torch.arange(b) % 2 == 0
    l0 = torch.where(first_right[:, None], good + noise[0] * 0.3, noise[0] * 2)
    l1 = torch.where(first_right[:, None], noise[1] * 2, good + noise[1] * 0.3)
    pair = {"video": EncoderOutput(l0), "audio_text": EncoderOutput(l1)}
    fusion = make("attention", 2, hidden=16)
    opt = torch.optim.Adam(fusion.parameters(), lr=0.02)
    for _ in range(200):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(fusion(pair), labels).backward()
        opt.step()
    fusion.eval()
    with torch.no_grad():
        w, _ = fusion.branch_weights(pair)
        fusion(pair)
    assert w[first_right, 0].mean() > 0.8 and w[~first_right, 1].mean() > 0.8
    rep = fusion.report()
    assert rep["samples"] == b and sum(rep["mean_weights"].values()) == pytest.approx(1.0)


def test_feature_level_reads_embeddings_and_ignores_absent_ones():
    fusion = make("feature-level", 2, dropout=0.0).eval()
    assert FeatureLevelFusion.uses_embeddings and fusion.reads_embedding == [True, False]
    outs = outputs(2, b=3, absent={0: [1]})
    base = fusion(outs)
    outs[0].embedding[1] = 1e6  # absent: must not matter
    outs[0].embedding[0] += 1.0  # present: must matter
    changed = fusion(outs)
    torch.testing.assert_close(changed[1], base[1])
    assert not torch.allclose(changed[0], base[0])
    rep = fusion.report()
    assert rep["inputs"] == {"video": "embedding[16]", "audio_text": "logits[7]"}
    assert sum(rep["weight_share"].values()) == pytest.approx(1.0)


def test_bad_fusion_options_fail_clearly():
    with pytest.raises(ConfigError, match="init_weights: 3 values for 2 branches"):
        make("weighted-late", 2, init_weights=[1.0, 1.0, 1.0])
    with pytest.raises(ConfigError, match="fusion.hidden"):
        make("attention", 2, hidden=0)
    with pytest.raises(ValueError, match="at least one branch"):
        WeightedLateFusion(WeightedLateFusion.make_config({}), C, [])


def test_registered_classes():
    assert isinstance(make("enhanced-late", 2), EnhancedLateFusion)
    assert isinstance(make("attention", 2), AttentionFusion)


@pytest.mark.parametrize("name", FUSIONS)
def test_fusions_take_branches_by_name_never_by_position(name):
    fusion = make(name, 3).eval()
    outs = outputs(3, absent={1: [0]})
    reversed_order = dict(reversed(list(outs.items())))
    with torch.no_grad():
        torch.testing.assert_close(fusion(reversed_order), fusion(outs))
    with pytest.raises(TypeError, match="mapping of branch name"):
        fusion(list(outs.values()))
    with pytest.raises(ValueError, match="built for branches"):
        fusion({k: v for k, v in outs.items() if k != "meta"})
