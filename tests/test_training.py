"""The trainer: schedule, early stopping, precision, resumable state, accumulation, determinism, the
staged pipeline on real RAVDESS features, and resuming a run killed with SIGKILL."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from emofuse.core.config import ComponentRef, DataConfig, TrainConfig, validate
from emofuse.core.engine.compose import build_fusion, build_loss
from emofuse.core.engine.distributed import DistContext
from emofuse.core.errors import ConfigError
from emofuse.core.interfaces import BranchInfo
from emofuse.core.engine.metrics import classification_metrics
from emofuse.core.engine.model_io import load_model
from emofuse.core.engine.precision import resolve_precision
from emofuse.core.engine.schedule import warmup_decay, warmup_decay_factor
from emofuse.core.engine.train_state import (
    TrainingState,
    capture_rng,
    load_training_state,
    restore_rng,
    save_training_state,
)
from emofuse.core.engine.branch_outputs import BranchOutputs
from emofuse.core.engine.fit import EarlyStopping, FitSettings, fit
from emofuse.core.engine.fusion_stage import FusionTask, name_report
from emofuse.core.engine.training import train_run

C = 8
DATA = {"dataset": "ravdess", "limit": 240}
FEATURES = {"name": "features", "features": ["au"], "hidden_dims": [32], "dropout": 0.2}


# -- pieces ----------------------------------------------------------------------------------------
def test_warmup_then_cosine_decay():
    factors = [warmup_decay_factor(s, 100, 10) for s in range(100)]
    assert factors[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert factors[10] == pytest.approx(1.0)
    assert factors[55] == pytest.approx(0.5, abs=0.02)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:])) and factors[-1] < 0.01
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = warmup_decay(opt, 20, 0.25)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 / 5)
    for _ in range(5):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)


def test_linear_decay_falls_along_a_straight_line():
    factors = [warmup_decay_factor(s, 100, 10, "linear") for s in range(101)]
    assert factors[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert factors[10] == 1.0 and factors[55] == pytest.approx(0.5) and factors[100] == 0.0
    steps = [b - a for a, b in zip(factors[10:], factors[11:])]
    assert steps == pytest.approx([-1 / 90] * 90)
    assert factors[30] < warmup_decay_factor(30, 100, 10, "cosine")  # the cosine stays high longer
    short = [warmup_decay_factor(step, 10, 2, "linear") for step in range(11)]  # the plain MELD control's use
    assert short[:2] == [0.5, 1.0]
    assert short[2] == 1.0 and short[6] == pytest.approx(0.5) and short[10] == 0.0
    assert all(a >= b for a, b in zip(short[1:], short[2:]))
    with pytest.raises(ConfigError, match="lr_decay"):
        validate({"train": {"lr_decay": "step"}})
    assert validate({"train": {"lr_decay": "linear"}}).train.lr_decay == "linear"


def test_the_trainer_decays_the_learning_rate_as_train_lr_decay_says(tmp_path):
    """One optimizer step an epoch (64 clips, batches of 64), no warm-up: the lr after epoch e is
    lr * (1 - (e + 1) / 4) along the line, lr * (1 + cos(pi (e + 1) / 4)) / 2 along the cosine."""
    lrs = {}
    for decay in ("linear", "cosine"):
        train = TrainConfig(epochs=4, batch_size=64, lr=0.1, warmup_fraction=0.0, patience=10, lr_decay=decay)
        _, outcome = _fit_fusion(tmp_path, decay, train)
        lrs[decay] = [r["lr"] for r in outcome.history]
    assert lrs["linear"] == pytest.approx([0.075, 0.05, 0.025, 0.0])
    assert lrs["cosine"] == pytest.approx([0.05 * (1 + np.cos(np.pi * (e + 1) / 4)) for e in range(4)], abs=1e-12)


def test_early_stopping_maximises_metrics_and_minimises_loss():
    acc = EarlyStopping("accuracy", patience=2)
    assert [acc.update(v, e) for e, v in enumerate([0.3, 0.5, 0.4, 0.5])] == [True, True, False, False]
    assert acc.should_stop and acc.best == 0.5 and acc.best_epoch == 1
    loss = EarlyStopping("loss", patience=3)
    assert [loss.update(v, e) for e, v in enumerate([2.0, 1.0, float("nan"), 0.5])] == [True, True, False, True]
    restored = EarlyStopping("loss", 3)
    restored.load_state_dict(loss.state_dict())
    assert (restored.best, restored.best_epoch, restored.bad_epochs) == (0.5, 3, 0)


def test_precision_choices():
    auto = resolve_precision("auto", "cpu")
    assert (auto.name, auto.dtype, auto.scaler) == ("fp32", None, None)
    bf16 = resolve_precision("bf16", "cpu")
    with bf16.autocast():
        assert (torch.ones(2, 3) @ torch.ones(3, 2)).dtype == torch.bfloat16
    fp16 = resolve_precision("fp16", "cpu")
    assert fp16.dtype == torch.float16 and fp16.scaler is not None
    with pytest.raises(ConfigError, match="precision"):
        resolve_precision("fp8", "cpu")


def test_optimizer_and_rng_state_survive_safetensors(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        model(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    rng = capture_rng()
    state = TrainingState("fp", 2, dict(model.state_dict()), None, opt.state_dict(), {"x": 1}, None,
                          {"best": 0.5, "best_epoch": 1, "bad_epochs": 0}, [{"epoch": 0}], [rng])
    save_training_state(tmp_path / "last", state)
    assert not list(tmp_path.glob("*.pt")) and (tmp_path / "last.safetensors").is_file()
    expected_next = torch.rand(3)
    loaded = load_training_state(tmp_path / "last")
    restore_rng(*loaded.rng[0])
    assert torch.equal(torch.rand(3), expected_next)
    # the reloaded optimizer takes exactly the step the original takes
    twin = torch.nn.Linear(4, 3)
    twin.load_state_dict(loaded.module)
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=1e-2, weight_decay=0.1)
    twin_opt.load_state_dict(loaded.optimizer)
    x = torch.randn(5, 4)
    for m, o in ((model, opt), (twin, twin_opt)):
        m(x).pow(2).sum().backward()
        o.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    assert loaded.epoch == 2 and loaded.early_stopping["best"] == 0.5 and loaded.history == [{"epoch": 0}]


def test_fusion_reports_name_classes():
    rep = name_report({"weights": {"a": 0.6}, "class_bias": [0.1, -0.2]}, ["happy", "sad"])
    assert rep == {"weights": {"a": 0.6}, "class_bias": {"happy": 0.1, "sad": -0.2}}


# -- the loop on synthetic branch outputs (no data pipeline: fast and exact) -----------------------
def _synthetic_outputs(n: int, seed: int) -> BranchOutputs:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, (n,), generator=g)
    good = torch.nn.functional.one_hot(labels, C).float() * 2
    return BranchOutputs(
        ids=[f"s{i}" for i in range(n)], labels=labels,
        logits={"a": good + torch.randn(n, C, generator=g) * 2, "b": good * 0.5 + torch.randn(n, C, generator=g)},
        embedding={"a": None, "b": None},
        present={"a": torch.ones(n, dtype=torch.bool), "b": torch.rand(n, generator=g) > 0.2},
    )


def _fit_fusion(tmp: Path, name: str, train: TrainConfig, fusion: str = "enhanced-late", progress: bool = False):
    torch.manual_seed(0)
    outputs = {"train": _synthetic_outputs(64, 1), "val": _synthetic_outputs(32, 2), "test": _synthetic_outputs(32, 3)}
    infos = [BranchInfo("a", C, 0, ("video",)), BranchInfo("b", C, 0, ("audio",))]
    module = build_fusion(ComponentRef(name=fusion), C, infos)
    task = FusionTask(module, outputs, ["a", "b"], train, DistContext())
    loss = build_loss(ComponentRef(name="focal", gamma=2.0), C)
    settings = FitSettings(stage="fusion", train=train, num_classes=C, run_dir=tmp / name, fingerprint=name,
                           progress=progress)
    return module, fit(task, loss, settings, DistContext())


def test_gradient_accumulation_matches_the_large_batch(tmp_path):
    common = dict(epochs=3, lr=0.05, weight_decay=0.01, warmup_fraction=0.2, patience=10, seed=0)
    big, _ = _fit_fusion(tmp_path, "big", TrainConfig(batch_size=16, grad_accumulation=1, **common))
    small, _ = _fit_fusion(tmp_path, "small", TrainConfig(batch_size=8, grad_accumulation=2, **common))
    torch.testing.assert_close(big.weights, small.weights, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(big.class_bias, small.class_bias, rtol=1e-5, atol=1e-6)
    untrained = build_fusion(ComponentRef(name="enhanced-late"), C, [BranchInfo("a", C, 0, ()), BranchInfo("b", C, 0, ())])
    assert not torch.allclose(big.class_bias, untrained.class_bias)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_on_cpu(tmp_path, precision):
    train = TrainConfig(epochs=3, batch_size=16, lr=0.05, precision=precision, patience=10, monitor="loss")
    module, outcome = _fit_fusion(tmp_path, precision, train, fusion="attention")
    losses = [r["train_loss"] for r in outcome.history]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_progress_prints_one_line_per_epoch_under_the_cli_reporter_and_nothing_without(tmp_path, capsys):
    from rich.console import Console

    from emofuse.cli.progress import RichReporter
    from emofuse.core.engine.progress import reporting

    _fit_fusion(tmp_path, "silent", TrainConfig(epochs=2, batch_size=16), progress=True)
    assert capsys.readouterr().out == ""  # the engine never prints: only the CLI's reporter does
    with reporting(RichReporter(Console())):
        _fit_fusion(tmp_path, "progress", TrainConfig(epochs=2, batch_size=16), progress=True)
    out = capsys.readouterr().out
    assert "fusion epoch 1/2: train loss" in out and "fusion epoch 2/2" in out and "val accuracy" in out


def test_early_stopping_stops_and_keeps_the_best_weights(tmp_path):
    train = TrainConfig(epochs=40, batch_size=16, lr=0.5, patience=2, monitor="loss", warmup_fraction=0.0)
    module, outcome = _fit_fusion(tmp_path, "stop", train)
    assert outcome.stopped_early and len(outcome.history) < 40
    best = min(outcome.history, key=lambda r: r["val_loss"])
    assert outcome.best_epoch == best["epoch"] and outcome.best_val["loss"] == pytest.approx(best["val_loss"])
    state = load_training_state(tmp_path / "stop" / "last")
    assert state.finished and torch.equal(state.best_module["weights"], module.weights.detach())
    rows = [json.loads(line) for line in (tmp_path / "stop" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(len(outcome.history)))


# -- real data ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundle(shared_data):
    from emofuse.core.data.pipeline import load_data

    return load_data(DataConfig(**DATA), {"features", "metadata", "text"})


def _branch_config(tmp: Path, name: str, seed: int = 0, **train) -> object:
    return validate({
        "name": name, "output_dir": str(tmp), "data": DATA, "branches": {"video": FEATURES},
        "train": {"epochs": 3, "batch_size": 32, "lr": 3e-3, "seed": seed, **train},
    })


def _scores(model, bundle, split: str) -> torch.Tensor:
    """Logits of a whole composed model (branches and fusion) on a split, straight from the loader."""
    model.eval()
    logits = []
    with torch.no_grad():
        for batch in bundle.loader(split, batch_size=64, shuffle=False, seed=0, modalities=model.modalities):
            logits.append(model(batch)[0])
    return torch.cat(logits)


def test_single_branch_run_is_seeded_saved_and_reloadable(tmp_path, bundle):
    first = train_run(_branch_config(tmp_path, "a"), data=bundle, progress=False)
    run = tmp_path / "a"
    for name in ("model.safetensors", "model.json", "last.safetensors", "last.json", "metrics.jsonl", "result.json",
                 "config.toml"):
        assert (run / name).is_file(), name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2] and rows == first.history
    assert set(first.metrics) == {"train", "val", "test"} and 0 <= first.metrics["test"]["accuracy"] <= 1

    # the saved model, rebuilt from its sidecar, scores the test split exactly as reported
    loaded = load_model(first.checkpoint)
    labels = torch.tensor([s.label for s in bundle.splits["test"]])
    again = classification_metrics(labels, _scores(loaded.model, bundle, "test"), C)
    assert again["accuracy"] == pytest.approx(first.metrics["test"]["accuracy"], abs=1e-6)
    assert loaded.meta["metrics"]["test"]["accuracy"] == first.metrics["test"]["accuracy"]

    # same seed, same numbers; another seed, other numbers
    second = train_run(_branch_config(tmp_path, "b"), data=bundle, progress=False)
    assert second.metrics == first.metrics
    assert [r["val_loss"] for r in second.history] == [r["val_loss"] for r in first.history]
    other = train_run(_branch_config(tmp_path, "c", seed=1), data=bundle, progress=False)
    assert [r["train_loss"] for r in other.history] != [r["train_loss"] for r in first.history]

    # a finished run is not trained again
    stamp = (run / "model.safetensors").stat().st_mtime_ns
    assert train_run(_branch_config(tmp_path, "a"), data=bundle, progress=False).metrics == first.metrics
    assert (run / "model.safetensors").stat().st_mtime_ns == stamp


def _fused_config(tmp: Path, name: str, fusion: str = "enhanced-late", epochs: int = 6) -> dict:
    return {
        "name": name, "output_dir": str(tmp), "data": DATA,
        "branches": {"video": FEATURES, "audio": {**FEATURES, "features": ["mfcc"]}},
        "fusion": {"name": fusion},
        "loss": {"name": "focal", "alpha": 1.0, "gamma": 2.0},
        "train": {"epochs": 3, "batch_size": 32, "lr": 3e-3, "seed": 0},
        "fusion_train": {"epochs": epochs, "batch_size": 8, "lr": 1e-2, "grad_accumulation": 2, "patience": 50,
                         "warmup_fraction": 0.1, "seed": 0},
    }


def test_staged_enhanced_late_fusion_on_real_features(tmp_path, bundle):
    result = train_run(validate(_fused_config(tmp_path, "fused")), data=bundle, progress=False)
    assert set(result.branch_results) == {"video", "audio"}
    report = result.fusion_report
    assert set(report["weights"]) == {"video", "audio"} and sum(report["weights"].values()) == pytest.approx(1.0)
    assert list(report["class_bias"]) == list(bundle.label_names)
    loaded = load_model(result.checkpoint)
    assert sum(p.numel() for p in loaded.model.fusion.parameters()) == 2 + C
    # the fusion trained on cached branch logits; the whole model run end to end scores the same
    labels = torch.tensor([s.label for s in bundle.splits["test"]])
    end_to_end = classification_metrics(labels, _scores(loaded.model, bundle, "test"), C)
    assert end_to_end["accuracy"] == pytest.approx(result.metrics["test"]["accuracy"], abs=1e-6)
    assert loaded.meta["fusion_report"]["class_bias"] == report["class_bias"]
    cache = tmp_path / ".cache"
    assert {p.name.split("-")[1] for p in cache.glob("outputs-*")} == {"video", "audio"}

    # another fusion over the same branches reuses them: nothing in stage 1 is trained again
    stamps = {b: r.checkpoint.stat().st_mtime_ns for b, r in result.branch_results.items()}
    other = train_run(validate(_fused_config(tmp_path, "fused-attention", fusion="attention", epochs=2)), data=bundle,
                      progress=False)
    assert {b: r.checkpoint.stat().st_mtime_ns for b, r in other.branch_results.items()} == stamps
    assert other.branch_results["video"].metrics == result.branch_results["video"].metrics
    assert "mean_weights" in other.fusion_report


KILLABLE = textwrap.dedent('''
    import json, sys, time
    import torch
    torch.set_num_threads(1)
    from emofuse.core.config import validate
    from emofuse.core.engine.training import train_run

    pause = float(sys.argv[2])

    def on_epoch(epoch, val):
        print(f"EPOCH {epoch}", flush=True)
        if epoch == 1:
            time.sleep(pause)  # the parent kills the process here

    result = train_run(validate(json.loads(sys.argv[1])), progress=False, on_epoch=on_epoch)
    print("RESULT " + json.dumps({"metrics": result.metrics, "history": result.history,
                                   "report": result.fusion_report}), flush=True)
''')


def _launch(script: Path, config: dict, pause: float) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    return subprocess.Popen([sys.executable, str(script), json.dumps(config), str(pause)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-2000:] + err[-2000:]
    line = next(line for line in out.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_a_killed_run_resumes_and_ends_as_an_uninterrupted_one(tmp_path, shared_data):
    script = tmp_path / "train.py"
    script.write_text(KILLABLE)
    killed_cfg = _fused_config(tmp_path / "killed", "run")
    reference = _launch(script, _fused_config(tmp_path / "reference", "run"), 0.0)  # runs alongside
    proc = _launch(script, killed_cfg, 60.0)
    for line in proc.stdout:  # the fusion stage's second epoch is saved before on_epoch runs
        if line.startswith("EPOCH 1"):
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    state = load_training_state(tmp_path / "killed" / "run" / "last")
    assert state.epoch == 1 and not state.finished
    assert not (tmp_path / "killed" / "run" / "result.json").exists()

    expected = _result(reference)
    resumed = _result(_launch(script, killed_cfg, 0.0))
    assert resumed["metrics"] == expected["metrics"]
    timing = {"seconds", "train_seconds"}
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    assert strip(resumed["history"]) == strip(expected["history"])
    assert resumed["report"] == expected["report"]


def test_torch_threads_leave_cores_to_dataloader_workers_unless_the_user_chose(monkeypatch):
    from emofuse.core.engine.training import threads_beside_workers

    monkeypatch.delenv("EMOFUSE_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        with threads_beside_workers(2, torch.device("cpu")):
            assert torch.get_num_threads() == 2
        assert torch.get_num_threads() == 4
        with threads_beside_workers(8, torch.device("cpu")):
            assert torch.get_num_threads() == 1
        with threads_beside_workers(0, torch.device("cpu")):
            assert torch.get_num_threads() == 4
        monkeypatch.setenv("EMOFUSE_THREADS", "3")
        with threads_beside_workers(2, torch.device("cpu")):
            assert torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(before)
