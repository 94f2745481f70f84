"""What an outside hostile-input check found (issue 34): names that leave the output folder, nested
options that pass a dry run, and messages that blame the wrong thing."""
from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from emofuse.cli.app import app

runner = CliRunner()


def error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


# --- item 3: every name that becomes a path stays inside --output ---------------------------------------
@pytest.mark.parametrize("study", ["../../x", "{tmp}/elsewhere", "a/../../b", ".."])
def test_a_study_name_cannot_lead_out_of_the_output_folder(tmp_path, study):
    output = tmp_path / "runs"
    result = runner.invoke(app, ["search", "--preset", "ravdess-egemaps", "--output", str(output), "--trials", "1",
                                 "--study", study.format(tmp=tmp_path)])
    line = error_line(result)
    assert "--study" in line and "must be a folder name inside the output folder" in line
    assert not (tmp_path / "elsewhere").exists() and not (tmp_path / "x").exists() and not (tmp_path / "b").exists()
    assert not output.exists() or not any(output.rglob("*.toml"))


# --- item 6: the dry run validates components nested in a wrapper and the [search] table ------------------
@pytest.mark.parametrize("assignment, expected", [
    ('branches.text.inner.max_text_tokens="../x"', r"branches.text.inner.max_text_tokens: Input should be a valid integer"),
    ("branches.text.inner.max_text_tokens=0", r"branches.text.inner.max_text_tokens: Input should be greater than"),
    ("branches.text.inner.bogus=1", r"branches.text.inner.bogus: Extra inputs are not permitted"),
    ("branches.text.inner.name=nope", r"no encoder named 'nope'"),
    ("search.trials={a=1}", r"search.trials: Unable to extract tag using discriminator 'type'"),
    ("search.space={a=1}", r"search.space: Unable to extract tag"),
    ('search.trials={type="int", low=1, high=3}', r"trials: Extra inputs are not permitted"),
])
def test_dry_run_refuses_bad_nested_options(assignment, expected):
    import re

    line = error_line(runner.invoke(app, ["train", "--preset", "meld-finetune", "--set", assignment, "--dry-run"]))
    assert re.search(expected, line), line


def test_dry_run_still_accepts_the_nested_presets():
    turns = Path(__file__).resolve().parents[1] / "benchmarks" / "configs" / "meld-finetune-turns.toml"
    for source in (["--preset", "meld-finetune"], ["--config", str(turns)], ["--preset", "meld-context"]):
        result = runner.invoke(app, ["train", *source, "--dry-run"])
        assert result.exit_code == 0, result.output


# --- item 9: messages -----------------------------------------------------------------------------------
@pytest.mark.parametrize("assignment, expected", [
    ("name=inf", "--set name=inf: name: Input should be a valid string"),
    ("data.dataset=nan", "--set data.dataset=nan: data.dataset: Input should be a valid string"),
    ("train.bogus=nan", "--set train.bogus=nan: train.bogus: Extra inputs are not permitted"),
    ("train.lr=nan", "--set train.lr=nan: train.lr: must be a finite number, not NaN or infinity"),
    ("branches.audio_text.model_dim=inf", "branches.audio_text.model_dim: must be a finite number"),
])
def test_a_non_finite_value_gets_the_message_of_its_key(assignment, expected):
    line = error_line(runner.invoke(app, ["train", "--preset", "mm-lstm", "--set", assignment, "--dry-run"]))
    assert expected in line, line


def test_a_bad_name_flag_is_not_blamed_on_the_preset():
    line = error_line(runner.invoke(app, ["train", "--preset", "mm-lstm", "--name", "../x", "--dry-run"]))
    assert "preset" not in line and line.startswith("error: the options given: name: run name '../x'"), line
    line = error_line(runner.invoke(app, ["train", "--preset", "mm-lstm", "--limit", "0", "--dry-run"]))
    assert line.startswith("error: the options given: data.limit"), line
    # the preset itself is still named where it is at fault, and a --set where that is
    line = error_line(runner.invoke(app, ["train", "--preset", "mm-lstm", "--set", "train.lr=0.1",
                                          "--set", "train.epochs=-1", "--dry-run"]))
    assert line.startswith("error: --set train.epochs=-1: train.epochs"), line


def _train_args(output, *extra: str) -> list[str]:
    return ["train", "--preset", "au-features", "--output", str(output), "--name", "r", "--epochs", "2",
            "--limit", "96", "--set", "train.device=cpu", *extra]


def test_a_corrupt_resume_state_names_no_resume_and_no_resume_works(tmp_path, shared_data):
    result = runner.invoke(app, _train_args(tmp_path, "--data", str(shared_data)))
    assert result.exit_code == 0, result.output
    run = tmp_path / "r"
    (run / "result.json").unlink()  # as if killed before it finished: the next run resumes from last.*
    state = run / "last.safetensors"
    data = bytearray(state.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)
    state.write_bytes(bytes(data))
    line = error_line(runner.invoke(app, _train_args(tmp_path, "--data", str(shared_data))))
    assert "last.safetensors" in line and "--no-resume" in line, line
    result = runner.invoke(app, _train_args(tmp_path, "--data", str(shared_data), "--no-resume"))
    assert result.exit_code == 0, result.output


KILL_IN_SAVE = '''
import os, signal, sys
real_fsync = os.fsync
def fsync(fd):  # SIGKILL in the middle of writing the best checkpoint: its temp file is left behind
    if ".model.safetensors." in os.readlink(f"/proc/self/fd/{fd}"):
        os.kill(os.getpid(), signal.SIGKILL)
    real_fsync(fd)
os.fsync = fsync
from emofuse.cli.app import main
sys.argv = ["emofuse"] + sys.argv[1:]
main()
'''


def test_a_kill_during_a_checkpoint_save_leaves_no_temp_file_after_the_resumed_run(tmp_path, shared_data):
    import os
    import signal
    import subprocess
    import sys

    script = tmp_path / "killed.py"
    script.write_text(KILL_IN_SAVE)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    output = tmp_path / "runs"
    args = _train_args(output, "--data", str(shared_data))
    killed = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert list((output / "r").glob(".model.safetensors.*.tmp")), "the kill left no temp file to clean"
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert not list(output.rglob("*.tmp"))


# --- item 7: "whole clips" has a documented ceiling -----------------------------------------------------
def _long_wav(path, source, seconds: float) -> None:
    """A real RAVDESS clip repeated to `seconds` of 16 kHz mono PCM."""
    import wave

    import numpy as np

    from emofuse.core.data.decode import decode_audio

    clip = decode_audio(source)
    audio = np.tile(clip, int(seconds * 16_000 / len(clip)) + 1)[: int(seconds * 16_000)]
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16_000)
        out.writeframes((np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes())


def test_whole_clip_audio_stops_at_the_documented_ceiling(tmp_path, shared_data, speech_fusion_checkpoint):
    from emofuse.core.apps.predict import MAX_AUDIO_SECONDS_CEILING, load
    from emofuse.core.errors import ConfigError

    source = sorted((shared_data / "ravdess-speech" / "Actor_01").glob("*.ogg"))[0]
    long_clip = tmp_path / "long.wav"
    _long_wav(long_clip, source, MAX_AUDIO_SECONDS_CEILING + 20)
    predictor = load(speech_fusion_checkpoint, device="cpu", max_audio_seconds=None)  # 0 on the command line
    seen = []
    (speech,) = [enc for enc in predictor.model.branches.values() if "audio" in enc.modalities]
    forward = speech.forward
    speech.forward = lambda batch, *a, **k: seen.append(batch.audio.shape[1]) or forward(batch, *a, **k)
    (record,) = predictor.predict([long_clip], text="Kids are talking by the door")
    assert seen == [int(MAX_AUDIO_SECONDS_CEILING * 16_000)]
    assert "the ceiling of whole-clip decoding" in record["warning"] and "probabilities" in record
    with pytest.raises(ConfigError, match=r"at most 300, the ceiling"):
        load(speech_fusion_checkpoint, device="cpu", max_audio_seconds=3600)
    line = error_line(runner.invoke(app, ["predict", str(speech_fusion_checkpoint), str(long_clip),
                                          "--max-audio-seconds", "3600"]))
    assert "the ceiling" in line and "--max-audio-seconds 0" in line
