"""Hyper-parameter search: the space, resumable studies, workers sharing one study (SQLite and a real
PostgreSQL server), pruning, the summary, and the exported best config's round trip.

Trials train a real (small) model on real data: two linear branches over the RAVDESS per-clip
facial action units ("video") and MFCC values ("audio_text"), fused by the real `enhanced-late`
fusion with the real focal loss, split by actor. `FeatureTrainer` implements the search's
`Trainer` seam the same way `emofuse.core.engine.training` does: stage 1 trains each branch, stage 2 the
fusion over the frozen branches' cached logits.
"""
from __future__ import annotations

import csv
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Mapping

import numpy as np
import optuna
import pytest
import torch
from rich.console import Console
from torch import nn

from emofuse.cli import app as cli_app
from emofuse.core.checkpoint import load_checkpoint, save_checkpoint
from emofuse.core.component import ComponentConfig
from emofuse.core.engine.compose import build_loss, build_model
from emofuse.core.config import RunConfig, load_toml, validate
from emofuse.core.errors import ConfigError
from emofuse.core.hookspecs import hookimpl
from emofuse.core.interfaces import Encoder
from emofuse.core.engine.metrics import classification_metrics
from emofuse.core.presets import compose_config
from emofuse.core.registry import Provider, Registry
from emofuse.core.apps.search import (
    SearchOptions,
    Study,
    open_storage,
    resolve_scope,
    run_search,
)
from emofuse.core.apps.search_space import SearchSpace, default_space
from emofuse.core.types import FEATURES, Batch, EncoderOutput

TESTS = Path(__file__).resolve().parent
FEATURE_TABLE = "ravdess-au-mfcc.csv.gz"
DATA = TESTS.parent.parent / "shared" / "data" / FEATURE_TABLE
NUM_CLASSES = 8


# -- a real small model on real data -----------------------------------------------------------------
class FeatureLinearConfig(ComponentConfig):
    features: str = "au"


class FeatureLinear(Encoder):
    """Linear classifier over one precomputed per-clip feature vector."""

    name = "test-feature-linear"
    modalities = (FEATURES,)
    Config = FeatureLinearConfig
    WIDTH = {"au": 35, "mfcc": 259}

    def __init__(self, config: FeatureLinearConfig, num_classes: int):
        super().__init__(config, num_classes)
        self.norm = nn.LayerNorm(self.WIDTH[config.features])
        self.head = nn.Linear(self.WIDTH[config.features], num_classes)

    def forward(self, batch: Batch, extracted: Any = None) -> EncoderOutput:
        return EncoderOutput(self.head(self.norm(batch.features[self.config.features])))


class _TestPlugin:
    @staticmethod
    @hookimpl
    def register_encoders():
        return [FeatureLinear]


def make_registry() -> Registry:
    registry = Registry().load_entry_points()
    registry.add_plugin(_TestPlugin, Provider("test-search", "emofuse-tests", "0"))
    return registry


def load_features(path: Path = DATA) -> dict[str, dict[str, torch.Tensor]]:
    """The RAVDESS feature table split by actor: 1-8 train, 9-10 val, 11-12 test."""
    au, mfcc, labels, actors = [], [], [], []
    with gzip.open(path, "rt", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        n_au = sum(h.startswith("au_") for h in header)
        for row in reader:
            parts = row[0].split("-")
            labels.append(int(parts[2]) - 1)
            actors.append(int(parts[6]))
            values = np.asarray(row[1:], dtype=np.float32)
            au.append(values[:n_au])
            mfcc.append(values[n_au:])
    au_t, mfcc_t = torch.tensor(np.stack(au)), torch.tensor(np.stack(mfcc))
    labels_t, actors_t = torch.tensor(labels), torch.tensor(actors)
    splits = {"train": actors_t <= 8, "val": (actors_t >= 9) & (actors_t <= 10), "test": actors_t >= 11}
    return {name: {"au": au_t[m], "mfcc": mfcc_t[m], "labels": labels_t[m]} for name, m in splits.items()}


def as_batch(split: Mapping[str, torch.Tensor], index: torch.Tensor | None = None) -> Batch:
    pick = (lambda t: t[index]) if index is not None else (lambda t: t)
    labels = pick(split["labels"])
    n = labels.shape[0]
    return Batch(ids=[str(i) for i in range(n)], labels=labels, present={FEATURES: torch.ones(n, dtype=torch.bool)},
                 features={"au": pick(split["au"]), "mfcc": pick(split["mfcc"])})


class FeatureTrainer:
    """The search's `Trainer` over `FeatureLinear` branches: deterministic for a given config."""

    def __init__(self, registry: Registry, *, epoch_delay: float = 0.0, interrupt_on_call: int | None = None):
        self.registry = registry
        self.epoch_delay = epoch_delay
        self.interrupt_on_call = interrupt_on_call
        self.calls = 0
        self.branch_trainings = 0
        self.trained_configs: list[RunConfig] = []

    def _fit(self, params, forward: Callable[[torch.Tensor], torch.Tensor], labels: torch.Tensor, loss_fn,
             stage, n: int, on_epoch: Callable[[int], None] | None = None) -> None:
        optimizer = torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay)
        generator = torch.Generator().manual_seed(stage.seed)
        for epoch in range(stage.epochs):
            for index in torch.randperm(n, generator=generator).split(stage.batch_size):
                optimizer.zero_grad()
                loss_fn(forward(index), labels[index]).backward()
                optimizer.step()
            if on_epoch is not None:
                on_epoch(epoch)

    def _train_branch(self, config: RunConfig, branch: str, data) -> dict[str, torch.Tensor]:
        torch.manual_seed(config.train.seed)
        single = config.model_copy(update={"branches": {branch: config.branches[branch]}, "fusion": None})
        model = build_model(single, NUM_CLASSES, registry=self.registry)
        encoder = model.branches[branch]
        train = data["train"]
        loss = build_loss(config.loss, NUM_CLASSES, registry=self.registry)
        self._fit(encoder.parameters(), lambda i: encoder(as_batch(train, i)).logits, train["labels"], loss,
                  config.train, train["labels"].shape[0])
        return {k: v.detach().clone() for k, v in encoder.state_dict().items()}

    def train_branches(self, config: RunConfig, *, data) -> dict[str, Path]:
        paths = {}
        for branch in config.branches:
            path = Path(config.output_dir) / "branches" / branch / "model"
            if not path.with_suffix(".safetensors").is_file():
                save_checkpoint(path, self._train_branch(config, branch, data), {"branch": branch})
                self.branch_trainings += 1
            paths[branch] = path.with_suffix(".safetensors")
        return paths

    def train(self, config: RunConfig, *, on_epoch, data, branch_checkpoints=None):
        self.calls += 1
        self.trained_configs.append(config)
        if self.interrupt_on_call == self.calls:
            raise KeyboardInterrupt("simulated Ctrl-C in the middle of a trial")
        model = build_model(config, NUM_CLASSES, registry=self.registry)
        for branch, encoder in model.branches.items():
            if branch_checkpoints:
                state, _ = load_checkpoint(branch_checkpoints[branch])
            else:
                state = self._train_branch(config, branch, data)
            encoder.load_state_dict(state)
            encoder.requires_grad_(False).eval()
        with torch.no_grad():  # stage 2 reads the frozen branches' cached logits
            cached = {name: {b: enc(as_batch(split)).logits for b, enc in model.branches.items()}
                      for name, split in data.items()}
        stage = config.fusion_train or config.train
        torch.manual_seed(stage.seed)
        fusion = model.fusion
        train = data["train"]
        loss = build_loss(config.loss, NUM_CLASSES, registry=self.registry)

        def fused(split: str, index=None) -> torch.Tensor:
            return fusion({b: EncoderOutput(logits if index is None else logits[index])
                           for b, logits in cached[split].items()})

        def scores(split: str) -> dict[str, float]:
            with torch.no_grad():
                return classification_metrics(data[split]["labels"], fused(split), NUM_CLASSES)

        def epoch_done(epoch: int) -> None:
            time.sleep(self.epoch_delay)
            on_epoch(epoch, scores("val"))

        self._fit(list(fusion.trainable_parameters()), lambda i: fused("train", i), train["labels"], loss, stage,
                  train["labels"].shape[0], epoch_done)
        return SimpleNamespace(metrics={s: scores(s) for s in ("val", "test")},
                               run_dir=Path(config.output_dir) / config.name)


def base_config(tmp: Path, **train: Any) -> RunConfig:
    """Enhanced late fusion + focal loss over the two feature branches, as the reference design."""
    return validate({
        "name": "feat",
        "branches": {"video": {"name": "test-feature-linear", "features": "au"},
                     "audio_text": {"name": "test-feature-linear", "features": "mfcc"}},
        "fusion": {"name": "enhanced-late"},
        "loss": {"name": "focal", "alpha": 1.0, "gamma": 2.0},
        "train": {"epochs": 15, "batch_size": 32, "lr": 3e-3, "seed": 0},
        "fusion_train": {"epochs": 4, "batch_size": 8, "lr": 1e-4, "seed": 0, **train},
        "output_dir": str(tmp / "runs"),
    })


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one intra-op thread is many times faster than two that spin-wait."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def features(shared_data):
    return load_features(shared_data / FEATURE_TABLE)


@pytest.fixture(scope="module")
def registry():
    return make_registry()


def options(tmp: Path, **kw: Any) -> SearchOptions:
    kw.setdefault("storage", f"sqlite:///{tmp / 'studies.db'}")
    kw.setdefault("sampler_seed", 0)
    return SearchOptions(**kw)


def finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.get_trials() if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]


def assert_no_trial_lost_or_repeated(study: optuna.Study, target: int, workers: int = 1) -> None:
    trials = study.get_trials()
    numbers = [t.number for t in trials]
    assert sorted(numbers) == list(range(len(trials)))  # unique, no gap
    done = finished(study)
    assert target <= len(done) <= target + workers - 1
    # No parameter set was trained to the end twice, except as the retry of a failed trial.
    keys = [json.dumps(t.params, sort_keys=True) for t in done]
    assert len(set(keys)) == len(keys)
    # Every failed trial (interrupted or killed) was re-run with its parameters.
    for failed in (t for t in trials if t.state == optuna.trial.TrialState.FAIL):
        retries = [t for t in done if t.params == failed.params and t.number > failed.number]
        assert retries, f"trial {failed.number} failed and was never re-run"


# -- the space ---------------------------------------------------------------------------------------
def test_space_applies_dotted_paths_shares_and_conditions():
    space = SearchSpace.parse({
        "fusion_train.lr": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True},
        "fusion.init_weights": {"type": "share", "branch": "video", "low": 0.3, "high": 0.8},
        "loss.name": {"type": "categorical", "choices": ["focal", "cross-entropy"]},
        "loss.gamma": {"type": "float", "low": 0.5, "high": 4.0, "when": {"loss.name": "focal"}},
    })
    base = {"branches": {"audio_text": {"name": "x"}, "video": {"name": "y"}, "meta": {"name": "z"}},
            "train": {"lr": 0.5, "epochs": 7}}
    out = space.apply(optuna.trial.FixedTrial({"fusion_train.lr": 1e-4, "fusion.init_weights.video": 0.6,
                                               "loss.name": "focal", "loss.gamma": 3.0}), base)
    assert out["fusion_train"] == {"lr": 1e-4, "epochs": 7}  # inherits `train`, then the searched key
    assert out["fusion"]["init_weights"] == pytest.approx([0.2, 0.6, 0.2])  # in branch order
    assert out["loss"] == {"name": "focal", "gamma": 3.0}
    assert base["train"] == {"lr": 0.5, "epochs": 7}  # the base is not modified
    # gamma is not drawn when the loss is not focal (the fixed trial holds no gamma: it would raise)
    out = space.apply(optuna.trial.FixedTrial({"fusion_train.lr": 1e-4, "fusion.init_weights.video": 0.6,
                                               "loss.name": "cross-entropy"}), base)
    assert out["loss"] == {"name": "cross-entropy"}


@pytest.mark.parametrize("spec,message", [
    ({"type": "float", "low": 1e-3, "high": 1e-5}, r"search\.train\.lr: .*low \(0\.001\) must be below high"),
    ({"type": "float", "low": 0.0, "high": 1.0, "log": True}, r"search\.train\.lr: .*log range needs low > 0"),
    ({"type": "normal", "low": 0, "high": 1}, r"search\.train\.lr: .*does not match any of the expected tags"),
    ({"type": "categorical", "choices": []}, r"search\.train\.lr\.choices: List should have at least 1 item"),
    ({"type": "float", "low": 0, "high": 1, "lo": 2}, r"search\.train\.lr\.lo: Extra inputs"),
])
def test_bad_specs_name_their_key(spec, message):
    with pytest.raises(ConfigError, match=message):
        SearchSpace.parse({"train.lr": spec})


def test_default_space_is_the_reference_designs(registry):
    fused = compose_config(preset="enhanced-late-fusion")
    scope = resolve_scope(fused, [], "auto")
    assert scope == "fusion"
    space = default_space(fused, scope="fusion", registry=registry)
    assert space["fusion_train.lr"] == {"type": "float", "low": 1e-5, "high": 1e-3, "log": True}
    assert space["fusion_train.batch_size"] == {"type": "categorical", "choices": [4, 6, 8]}
    assert space["fusion.init_weights"] == {"type": "share", "branch": "video", "low": 0.3, "high": 0.8}
    # `loss` trains the branches too, so over frozen branches only a fusion-stage loss may be searched.
    assert {k.split(".")[1] for k in space if k.startswith("fusion_loss.")} == {"alpha", "gamma"}
    assert not any(k.startswith("loss.") for k in space)
    # Retraining everything per trial, the focal loss's options are searched where they are.
    full = default_space(fused, scope="full", registry=registry)
    assert {"train.lr", "train.batch_size", "fusion.init_weights", "fusion_loss.alpha", "fusion_loss.gamma"} == set(full)
    assert full["fusion_loss.gamma"]["when"] == {"fusion_loss.name": "focal"}
    # A config whose one loss is focal searches it where it is.
    focal_only = fused.model_copy(update={"loss": fused.fusion_loss, "fusion_loss": None})
    assert default_space(focal_only, scope="full", registry=registry)["loss.gamma"]["when"] == {"loss.name": "focal"}
    # One branch, cross-entropy: learning rate and batch size of the only stage, nothing else.
    single = compose_config(preset="mm-lstm")
    assert resolve_scope(single, [], "auto") == "full"
    assert set(default_space(single, registry=registry)) == {"train.lr", "train.batch_size"}
    # Keys that change the branches force full retraining; asking for frozen branches then is an error.
    assert resolve_scope(fused, ["train.lr"], "auto") == "full"
    with pytest.raises(ConfigError, match=r"train\.lr change the branches"):
        resolve_scope(fused, ["train.lr"], "fusion")


def test_space_corners_are_checked_before_any_trial(tmp_path, registry, features):
    cfg = base_config(tmp_path).model_copy(update={"search": {"loss.gamma": {"type": "float", "low": 1, "high": 30}}})
    with pytest.raises(ConfigError, match=r"loss\.gamma: Input should be less than or equal to 20"):
        Study(cfg, options(tmp_path), registry=registry, trainer=FeatureTrainer(registry), data=features)


def test_storage_urls_are_checked_and_printed_without_passwords():
    from emofuse.core.apps.search import normalize_url, redact, sampler_seed

    assert redact("postgresql://me:secret@db.example/optuna") == "postgresql://me:***@db.example/optuna"
    assert normalize_url("postgres://me@host/db").startswith("postgresql")  # the alias SQLAlchemy dropped
    with pytest.raises(ConfigError, match="not a database URL"):
        normalize_url("runs/studies.db")
    # A resumed worker must not replay the first run's random draws.
    assert sampler_seed(7, 0) == 7 and sampler_seed(None, 5) is None
    assert len({sampler_seed(7, n) for n in range(20)}) == 20


# -- studies -----------------------------------------------------------------------------------------
def test_search_exports_a_best_config_that_reproduces_its_metric(tmp_path, registry, features, monkeypatch):
    trainer = FeatureTrainer(registry)
    result = run_search(base_config(tmp_path), options(tmp_path, n_trials=6, pruner="none"), registry=registry,
                        trainer=trainer, data=features)
    assert result.scope == "fusion" and result.counts["complete"] == 6
    assert trainer.branch_trainings == 2  # the branches were trained once for all six trials
    assert {"fusion_train.lr", "fusion_train.batch_size", "fusion.init_weights.video"} <= set(result.best_params)
    assert 0.3 <= result.best_params["fusion.init_weights.video"] <= 0.8
    summary = json.loads(result.summary_path.read_text())
    assert summary["best"]["value"] == result.best_value and summary["best"]["params"] == result.best_params
    assert len(summary["trials"]) == 6 and summary["counts"]["complete"] == 6
    if "fusion_loss" not in RunConfig.model_fields:
        assert any("focal alpha/gamma" in note for note in summary["notes"])
    assert set(result.importances) == set(result.best_params)
    assert sum(result.importances.values()) == pytest.approx(1.0)
    # `emofuse train --config best.toml` composes exactly this config ...
    trained = compose_config(config_file=result.best_config_path)
    assert trained == validate(load_toml(result.best_config_path))
    assert trained.fusion_train.lr == result.best_params["fusion_train.lr"]
    assert trained.fusion.options["init_weights"][0] == result.best_params["fusion.init_weights.video"]
    assert trained.name == "feat-best" and trained.search == {}
    # ... and retraining it from scratch (branches included) reproduces the best trial's metric.
    rerun = FeatureTrainer(registry).train(trained, on_epoch=lambda e, m: None, data=features)
    assert rerun.metrics["val"]["accuracy"] == pytest.approx(result.best_value, abs=1e-9)
    console = Console(record=True, width=120)  # what `emofuse search` prints of this result
    monkeypatch.setattr(cli_app, "console", console)
    cli_app._print_search_summary(result)
    text = console.export_text()
    assert f"best trial {result.best_number}" in text and "fusion_train.lr" in text and "importance" in text


def test_interrupted_study_resumes_where_it_stopped(tmp_path, registry, features):
    cfg = base_config(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        run_search(cfg, options(tmp_path, n_trials=7, pruner="none"), registry=registry,
                   trainer=FeatureTrainer(registry, interrupt_on_call=4), data=features)
    study = optuna.load_study(study_name="feat", storage=open_storage(f"sqlite:///{tmp_path / 'studies.db'}"))
    states = [t.state.name for t in study.get_trials()]
    # three trials done, the fourth failed by the interrupt and queued again with its parameters
    assert states == ["COMPLETE"] * 3 + ["FAIL", "WAITING"]
    interrupted = study.get_trials()[3]
    resumed = FeatureTrainer(registry)
    result = run_search(cfg, options(tmp_path, n_trials=7, pruner="none"), registry=registry,
                        trainer=resumed, data=features)
    assert result.counts["complete"] == 7 and resumed.calls == 4  # only the missing trials ran
    study = optuna.load_study(study_name="feat", storage=open_storage(f"sqlite:///{tmp_path / 'studies.db'}"))
    retry = study.get_trials()[4]
    assert retry.state.name == "COMPLETE" and retry.params == interrupted.params
    assert retry.user_attrs["retry_of"] == 3
    assert_no_trial_lost_or_repeated(study, 7)
    # Running it again finds nothing left to do; a larger target continues the numbering.
    again = FeatureTrainer(registry)
    run_search(cfg, options(tmp_path, n_trials=7), registry=registry, trainer=again, data=features)
    assert again.calls == 0
    run_search(cfg, options(tmp_path, n_trials=8), registry=registry, trainer=again, data=features)
    assert again.calls == 1 and max(t.number for t in study.get_trials()) == 8


def test_resume_refuses_a_changed_study(tmp_path, registry, features):
    cfg = base_config(tmp_path)
    run_search(cfg, options(tmp_path, n_trials=1), registry=registry, trainer=FeatureTrainer(registry), data=features)
    with pytest.raises(ConfigError, match="study 'feat' already exists"):
        Study(cfg, options(tmp_path, resume=False), registry=registry, trainer=FeatureTrainer(registry))
    changed = base_config(tmp_path, epochs=5)
    with pytest.raises(ConfigError, match="was started with a different config"):
        Study(changed, options(tmp_path), registry=registry, trainer=FeatureTrainer(registry))
    narrowed = cfg.model_copy(update={"search": {"fusion_train.lr": {"type": "float", "low": 1e-4, "high": 1e-3}}})
    with pytest.raises(ConfigError, match="was started with a different space"):
        Study(narrowed, options(tmp_path), registry=registry, trainer=FeatureTrainer(registry))


def test_resume_refuses_a_study_whose_components_code_changed(tmp_path, registry, features, monkeypatch):
    """Trials of an edited (or upgraded) component are not comparable with the study's earlier ones."""
    from emofuse.core.apps import search

    cfg = base_config(tmp_path)
    run_search(cfg, options(tmp_path, n_trials=1), registry=registry, trainer=FeatureTrainer(registry), data=features)
    real = search.components_code

    def edited(config, reg):
        code = real(config, reg)
        code["encoder 'test-feature-linear'"] = {**code["encoder 'test-feature-linear'"], "provider": "emofuse-tests 1"}
        return code

    monkeypatch.setattr(search, "components_code", edited)
    with pytest.raises(ConfigError, match="its trials were run with other code \\(encoder 'test-feature-linear': "
                                          "provided by emofuse-tests 1 now, by emofuse-tests 0 before\\)"):
        Study(cfg, options(tmp_path), registry=registry, trainer=FeatureTrainer(registry))


def test_unpromising_trials_are_pruned_from_their_validation_scores(tmp_path, registry, features):
    cfg = base_config(tmp_path, epochs=6).model_copy(update={"search": {
        "fusion_train.lr": {"type": "float", "low": 1e-5, "high": 1.0, "log": True}}})
    trainer = FeatureTrainer(registry)
    study = Study(cfg, options(tmp_path, n_trials=7, pruner="median"), registry=registry, trainer=trainer,
                  data=features)
    # Five trials that learn (the median pruner's start-up), then two whose rate is too small to move
    # the fusion weights: their validation accuracy stays below the others' from the first epochs on.
    for lr in (1.0, 0.5, 0.8, 0.3, 0.6, 1e-5, 3e-5):
        study.study.enqueue_trial({"fusion_train.lr": lr})
    study.optimize()
    trials = study.study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 5 + ["PRUNED"] * 2
    assert all(len(t.intermediate_values) == 6 for t in trials[:5])
    assert all(len(t.intermediate_values) < 6 for t in trials[5:])  # stopped early, not trained to the end
    assert max(max(t.intermediate_values.values()) for t in trials[5:]) < study.study.best_value
    assert study.summarize().counts["pruned"] == 2


# -- several workers -----------------------------------------------------------------------------------
WORKER = r"""
import json, os, sys, time
sys.path.insert(0, {tests!r})
import test_search as t
t.torch.set_num_threads(1)  # tiny models: one thread per worker
args = json.loads(sys.argv[1])
registry = t.make_registry()
ready, go = os.path.join(args["sync"], f"ready-{{os.getpid()}}"), os.path.join(args["sync"], "go")
open(ready, "w").close()
while not os.path.exists(go):
    time.sleep(0.05)
cfg = t.base_config(t.Path(args["tmp"]))
opts = t.SearchOptions(storage=args["storage"], n_trials=args["n_trials"], sampler_seed=args["seed"], pruner="none",
                       heartbeat_interval=args.get("heartbeat", 30), grace_period=args.get("grace"))
t.run_search(cfg, opts, registry=registry, trainer=t.FeatureTrainer(registry, epoch_delay=args.get("delay", 0.0)),
             data=t.load_features())
"""


def start_workers(tmp: Path, storage: str, seeds: list[int], n_trials: int, **extra: Any) -> list[subprocess.Popen]:
    sync = tmp / "sync"
    sync.mkdir(exist_ok=True)
    script = WORKER.format(tests=str(TESTS))
    procs = [subprocess.Popen([sys.executable, "-c", script, json.dumps(
        {"tmp": str(tmp), "storage": storage, "n_trials": n_trials, "seed": seed, "sync": str(sync), **extra})])
        for seed in seeds]
    deadline = time.monotonic() + 60
    while len(list(sync.glob("ready-*"))) < len(procs):
        assert time.monotonic() < deadline, "workers did not start"
        assert all(p.poll() is None for p in procs), "a worker died while starting"
        time.sleep(0.05)
    (sync / "go").touch()
    return procs


def run_two_workers(tmp: Path, storage: str) -> None:
    procs = start_workers(tmp, storage, seeds=[11, 22], n_trials=10, delay=0.02)
    for p in procs:
        assert p.wait(timeout=120) == 0
    study = optuna.load_study(study_name="feat", storage=open_storage(storage))
    assert_no_trial_lost_or_repeated(study, 10, workers=2)
    workers = {t.user_attrs["worker"] for t in finished(study)}
    assert len(workers) == 2, f"both workers should have run trials, got {workers}"


def test_two_workers_share_one_sqlite_study(tmp_path, features):
    run_two_workers(tmp_path, f"sqlite:///{tmp_path / 'studies.db'}")


@pytest.fixture
def postgres_url():
    """A throwaway PostgreSQL server on a unix socket in a temp folder (as `postgres` when run as root)."""
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed: apt-get install postgresql")
    import importlib.util

    if not (importlib.util.find_spec("psycopg") or importlib.util.find_spec("psycopg2")):
        pytest.skip("no PostgreSQL driver for SQLAlchemy: pip install 'psycopg[binary]'")
    prefix: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        runuser = shutil.which("runuser")
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
        if not runuser:
            pytest.skip("running as root and runuser is missing")
        prefix = [runuser, "-u", "postgres", "--"]
    root = Path(tempfile.mkdtemp(prefix="emofuse-pg-"))
    if prefix:
        shutil.chown(root, "postgres")
    data = root / "data"
    port = 20000 + os.getpid() % 20000
    subprocess.run(prefix + [initdb, "-D", str(data), "-A", "trust", "-U", "emofuse"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    subprocess.run(prefix + [pg_ctl, "-D", str(data), "-l", str(root / "log"), "-w", "-o",
                             f"-k {root} -p {port} -c listen_addresses=''", "start"], check=True,
                   stdout=subprocess.DEVNULL)
    try:
        yield f"postgresql://emofuse@/postgres?host={root}&port={port}"
    finally:
        subprocess.run(prefix + [pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(root, ignore_errors=True)


def test_two_workers_share_one_postgresql_study(tmp_path, features, postgres_url):
    run_two_workers(tmp_path, postgres_url)


def kill_early_in_a_trial(proc: subprocess.Popen, tmp: Path, storage: str, *, finished_first: int):
    """SIGKILL the worker once `finished_first` trials are done and another is early in its epochs (so it
    cannot finish before the kill); returns the study and that trial as it was when killed."""
    study = None
    deadline = time.monotonic() + 90
    while True:
        assert time.monotonic() < deadline and proc.poll() is None
        if (tmp / "studies.db").exists():
            study = study or optuna.load_study(study_name="feat", storage=open_storage(storage))
            early = [t for t in study.get_trials() if t.state.name == "RUNNING" and 1 <= len(t.intermediate_values) <= 2]
            if len(finished(study)) >= finished_first and early:
                break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = study.get_trials()[early[0].number]
    assert killed.state.name == "RUNNING" and killed.params
    return study, killed


def test_killed_worker_trial_is_requeued_on_resume(tmp_path, registry, features):
    storage = f"sqlite:///{tmp_path / 'studies.db'}"
    (proc,) = start_workers(tmp_path, storage, seeds=[5], n_trials=6, delay=0.4, heartbeat=1, grace=2)
    study, killed = kill_early_in_a_trial(proc, tmp_path, storage, finished_first=2)
    # as if its worker ran on another machine: only the silent heartbeat can tell it died
    study._storage.set_trial_user_attr(killed._trial_id, "worker", "another-host:1")
    done_before = len(finished(study))
    time.sleep(2.5)  # the grace period passes without a heartbeat
    result = run_search(base_config(tmp_path), options(tmp_path, n_trials=6, heartbeat_interval=1, grace_period=2,
                                                       pruner="none"),
                        registry=registry, trainer=FeatureTrainer(registry), data=features)
    assert result.counts["complete"] == 6
    study = optuna.load_study(study_name="feat", storage=open_storage(storage))
    assert study.get_trials()[killed.number].state.name == "FAIL"
    retry = next(t for t in study.get_trials() if t.system_attrs.get("failed_trial") == killed.number)
    assert retry.state.name == "COMPLETE" and retry.params == killed.params
    assert len(finished(study)) == 6 and done_before >= 2
    assert_no_trial_lost_or_repeated(study, 6)


# -- the real trainer --------------------------------------------------------------------------------
def test_search_with_train_run_trains_the_branches_once_and_reproduces(tmp_path, shared_data):
    """`emofuse.core.engine.training.train_run` behind the search, on RAVDESS with two feature branches."""
    from emofuse.core.engine.training import train_run

    config = validate({
        "name": "real",
        "data": {"dataset": "ravdess", "data_dir": str(shared_data)},
        "branches": {"video": {"name": "features", "features": ["au"]},
                     "audio_text": {"name": "features", "features": ["mfcc"]}},
        "fusion": {"name": "enhanced-late"},
        "loss": {"name": "focal"},
        "train": {"epochs": 3, "batch_size": 32, "lr": 1e-3},
        "fusion_train": {"epochs": 3, "batch_size": 8, "lr": 1e-4},
        "output_dir": str(tmp_path / "runs"),
    })
    result = run_search(config, SearchOptions(n_trials=3, sampler_seed=0))
    assert result.scope == "fusion" and result.counts["complete"] == 3
    study_dir = tmp_path / "runs" / "search" / "real"
    assert (tmp_path / "runs" / "search" / "studies.db").is_file()  # the default storage
    branch_runs = sorted(p.name for p in (study_dir / "trials" / "branches").iterdir())
    assert [name.split("-")[0] for name in branch_runs] == ["audio_text", "video"]  # trained once, for all trials
    for n in range(3):
        used = json.loads((study_dir / "trials" / f"trial-{n:04d}" / "result.json").read_text())["branches"]
        assert sorted(Path(p).name for p in used.values()) == branch_runs
    trained = compose_config(config_file=result.best_config_path)
    rerun = train_run(trained, progress=False)
    assert rerun.metrics["val"]["accuracy"] == pytest.approx(result.best_value, abs=1e-6)


def test_a_trial_killed_on_this_machine_is_rerun_by_an_immediate_resume(tmp_path, registry, features):
    """No waiting for the heartbeat grace: a RUNNING trial whose worker process on this host is gone
    is failed and re-queued by the next run, which trains it before new ones."""
    storage = f"sqlite:///{tmp_path / 'studies.db'}"
    (proc,) = start_workers(tmp_path, storage, seeds=[5], n_trials=4, delay=0.4)  # default heartbeat: 30 s
    study, killed = kill_early_in_a_trial(proc, tmp_path, storage, finished_first=1)
    run_search(base_config(tmp_path), options(tmp_path, n_trials=4, pruner="none"), registry=registry,
               trainer=FeatureTrainer(registry), data=features)
    study = optuna.load_study(study_name="feat", storage=open_storage(storage))
    assert study.get_trials()[killed.number].state.name == "FAIL"
    assert not [t for t in study.get_trials() if t.state.name in ("RUNNING", "WAITING")]
    assert_no_trial_lost_or_repeated(study, 4)


def test_a_requeued_trial_runs_even_when_the_study_has_its_trials(tmp_path, registry, features):
    run_search(base_config(tmp_path), options(tmp_path, n_trials=2, pruner="none"), registry=registry,
               trainer=FeatureTrainer(registry), data=features)
    study = optuna.load_study(study_name="feat", storage=open_storage(f"sqlite:///{tmp_path / 'studies.db'}"))
    params = {**study.trials[0].params}
    params[next(iter(params))] = study.trials[0].distributions[next(iter(params))].low  # other params than both
    study.enqueue_trial(params, user_attrs={"retry_of": 0})  # what a heartbeat retry leaves behind
    run_search(base_config(tmp_path), options(tmp_path, n_trials=2, pruner="none"), registry=registry,
               trainer=FeatureTrainer(registry), data=features)
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3 and trials[2].params == params
