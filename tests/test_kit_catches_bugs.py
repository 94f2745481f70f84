"""The conformance kit fails closed and names the bug: an outside plugin (written against
`emofuse.core` alone) carrying one deliberate bug at a time is failed with a message naming it, and the
same plugin without the bug passes."""
from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from emofuse.core.config import validate
from emofuse.core.engine.fit import check_logits
from emofuse.core.errors import PluginError
from emofuse.core.registry import Problem, Provider, Registry
from emofuse.core.testing.checks import check_distribution, check_encoder, check_fusion

PLUGIN = textwrap.dedent('''
    import torch
    from torch import nn

    from emofuse.core import AUDIO, FEATURES, ComponentConfig, Encoder, EncoderOutput, Fusion, hookimpl

    class Options(ComponentConfig):
        pass

    class UnitsEncoder(Encoder):
        """A linear layer over the facial action units."""
        name = "units"
        modalities = (FEATURES,)
        Config = Options

        def __init__(self, config, num_classes):
            super().__init__(config, num_classes)
            self.head = nn.Linear(35, num_classes)

        def forward(self, batch, extracted=None):
            x = batch.features["au"]
            x = CENTRE(x)
            return EncoderOutput(SQUEEZE(self.head(x)), PRESENT)

    class EnergyEncoder(Encoder):
        """A frozen part (log energy of the waveform, cached) and a linear head."""
        name = "energy"
        modalities = (AUDIO,)
        Config = Options

        def __init__(self, config, num_classes):
            super().__init__(config, num_classes)
            self.head = nn.Linear(1, num_classes)

        def extract(self, batch):
            return [{"energy": w[:n].pow(2).mean().log1p().reshape(1)} for w, n in zip(batch.audio, batch.audio_lengths)]

        def forward(self, batch, extracted=None):
            energy = ENERGY
            return EncoderOutput(self.head(energy), present=batch.present[AUDIO])

    class MeanFusion(Fusion):
        """The mean of the present branches' logits, scaled, plus a bias per class."""
        name = "mean"
        Config = Options

        def __init__(self, config, num_classes, branches):
            super().__init__(config, num_classes, branches)
            self.scale = nn.Parameter(torch.ones(1))
            self.bias = nn.Parameter(torch.zeros(num_classes))

        def forward(self, outputs):
            total, count = 0, 0
            for out in self.ordered(outputs):
                present = out.presence().unsqueeze(1)
                total = total + MASKED
                count = count + present.float()
            return total / count.clamp(min=1) * self.scale + self.bias

    @hookimpl
    def register_encoders():
        return [UnitsEncoder, EnergyEncoder]

    @hookimpl
    def register_fusions():
        return [MeanFusion]
''')

CORRECT = {
    "CENTRE(x)": "x",
    "SQUEEZE(self.head(x))": "self.head(x)",
    "PRESENT": "present=batch.present[FEATURES]",
    "ENERGY": 'torch.where(batch.present[AUDIO][:, None], self.extracted_for(batch, extracted)["energy"], 0.0)',
    "MASKED": "torch.where(present, out.logits, torch.zeros_like(out.logits))",
}

#: bug -> (the component it breaks, the edit that makes it, the words the kit's failure must say)
BUGS = {
    "presence ignored": ("encoder units", {"PRESENT": "present=None"}, "ignores a missing modality"),
    "batch dependence": ("encoder units", {"CENTRE(x)": "x - x.mean(dim=0, keepdim=True)"},
                         "one clip's output depends on the rest of its batch"),
    "squeeze": ("encoder units", {"SQUEEZE(self.head(x))": "self.head(x).squeeze()"}, "breaks a batch of one"),
    "media in forward": ("encoder energy", {"ENERGY": "batch.audio.pow(2).mean(dim=1, keepdim=True).log1p()"},
                         "reads media in forward on the cached path"),
    "cached features of an absent modality": ("encoder energy", {"ENERGY": 'self.extracted_for(batch, extracted)["energy"]'},
                                              "reads cached features of an absent modality"),
    "fusion ignores presence": ("fusion mean", {"MASKED": "out.logits"}, "ignores the presence mask"),
    "NaN leak": ("fusion mean", {"MASKED": "present.float() * out.logits"},
                 "lets NaN from an absent branch leak into the fused output"),
}


def plugin_registry(tmp_path: Path, monkeypatch, edits: dict[str, str], module: str) -> Registry:
    source = PLUGIN
    for marker, code in {**CORRECT, **edits}.items():
        source = source.replace(marker, code)
    (tmp_path / f"{module}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = Registry().load_entry_points()
    registry.add_plugin(importlib.import_module(module), Provider(module, "kit-bugs", "0.1"))
    assert not registry.problems, registry.problems
    return registry


def run_check(component: str, registry: Registry, tmp_path: Path) -> None:
    kind, name = component.split()
    if kind == "encoder":
        check_encoder(name, tmp_path, registry=registry)
    else:
        for branches in (1, 2, 3):
            check_fusion(name, branches, tmp_path, registry=registry)


def test_the_plugin_without_its_bugs_passes_the_kit(tmp_path, monkeypatch):
    registry = plugin_registry(tmp_path, monkeypatch, {}, "kit_correct")
    for component in ("encoder units", "encoder energy", "fusion mean"):
        run_check(component, registry, tmp_path)


@pytest.mark.parametrize("bug", sorted(BUGS))
def test_each_deliberate_bug_is_failed_with_a_message_naming_it(bug, tmp_path, monkeypatch):
    component, edits, words = BUGS[bug]
    registry = plugin_registry(tmp_path, monkeypatch, edits, "kit_" + bug.replace(" ", "_").lower())
    with pytest.raises(AssertionError) as failure:
        run_check(component, registry, tmp_path)
    assert words in str(failure.value), str(failure.value)
    assert component.split()[1] in str(failure.value)  # and names the component


def test_a_distribution_that_fails_to_import_registers_nothing_or_is_misspelled_fails(tmp_path, monkeypatch):
    broken = Registry()
    broken.problems.append(Problem(Provider("kit", "kit-broken", "0.1"), "failed to import kit: SyntaxError"))
    with pytest.raises(AssertionError, match="'kit-broken' failed to load: .*SyntaxError"):
        check_distribution("kit-broken", broken)

    empty = Registry()
    (tmp_path / "kit_empty.py").write_text("x = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    empty.add_plugin(importlib.import_module("kit_empty"), Provider("kit-empty", "kit-empty", "0.1"))
    with pytest.raises(AssertionError, match="registers no component"):
        check_distribution("kit-empty", empty)

    with pytest.raises(AssertionError, match="'emofsue' is not installed \\(misspelled\\?"):
        check_distribution("emofsue", Registry().load_entry_points())
    check_distribution("emofuse", Registry().load_entry_points())
    check_distribution("Emofuse", Registry().load_entry_points())  # pip's spelling rules


def test_the_suite_with_a_misspelled_distribution_fails_rather_than_skipping(tmp_path):
    (tmp_path / "test_kit.py").write_text(textwrap.dedent('''
        from emofuse.core.testing import ConformanceSuite

        class TestMine(ConformanceSuite):
            distribution = "emofuse-my-plugn"
    '''))
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_kit.py"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stdout[-2000:]
    assert "1 failed" in result.stdout and "'emofuse-my-plugn' is not installed" in result.stdout


def test_the_trainer_refuses_logits_not_shaped_batch_by_classes(tmp_path, monkeypatch, shared_data):
    import torch

    with pytest.raises(PluginError, match=r"shape \(7,\) for 1 labels; expected \(1, 7\) \(a .squeeze\(\)"):
        check_logits(torch.zeros(7), torch.zeros(1, dtype=torch.long), 7, "branch units")
    check_logits(torch.zeros(2, 7), torch.zeros(2, dtype=torch.long), 7, "branch units")

    from emofuse.core.engine.training import train_run

    registry = plugin_registry(tmp_path, monkeypatch, BUGS["squeeze"][1], "kit_squeeze_trained")
    config = validate({
        "name": "squeezed", "output_dir": str(tmp_path / "runs"),
        "data": {"dataset": "ravdess", "data_dir": str(shared_data), "split": "speaker", "limit": 24},
        "branches": {"video": {"name": "units"}},
        "train": {"epochs": 1, "batch_size": 1, "device": "cpu", "precision": "fp32"},
    })
    with pytest.raises(PluginError, match="squeeze"):
        train_run(config, registry=registry, progress=False)


def test_the_scaffold_templates_components_pass_the_stronger_kit(tmp_path, monkeypatch):
    """`emofuse new-plugin`'s components, imported in place (the installed run is in test_plugin_kit)."""
    from emofuse.core.apps.scaffold import new_plugin

    package = new_plugin("kit-scaffold", tmp_path)
    monkeypatch.syspath_prepend(str(package))
    registry = Registry().load_entry_points()
    registry.add_plugin(importlib.import_module("emofuse_kit_scaffold.plugin"),
                        Provider("kit-scaffold", "emofuse-kit-scaffold", "0.1"))
    check_encoder("kit-scaffold-audio", tmp_path, registry=registry)
    for branches in (1, 2, 3):
        check_fusion("kit-scaffold-mean", branches, tmp_path, registry=registry)


def test_training_an_encoder_that_reads_media_on_the_cached_path_is_one_clear_error(tmp_path, monkeypatch, shared_data):
    from emofuse.core.engine.training import train_run

    registry = plugin_registry(tmp_path, monkeypatch, BUGS["media in forward"][1], "kit_media_trained")
    config = validate({
        "name": "media", "output_dir": str(tmp_path / "runs"),
        "data": {"dataset": "ravdess", "data_dir": str(shared_data), "split": "speaker", "limit": 24},
        "branches": {"audio": {"name": "energy"}},
        "train": {"epochs": 1, "batch_size": 8, "device": "cpu", "precision": "fp32"},
    })
    with pytest.raises(PluginError, match="encoder 'energy' reads media in forward, but its features come from the "
                                          "cache, so the batch carries no audio"):
        train_run(config, registry=registry, progress=False)
