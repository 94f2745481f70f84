"""Shared test set-up: offline hubs, the real data folder, and small generated batches."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Face crops are cached under the user's cache folder by default; tests keep theirs apart.
import tempfile  # noqa: E402

os.environ.setdefault("EMOFUSE_CACHE_DIR", tempfile.mkdtemp(prefix="emofuse-test-cache-"))

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# Small test models run fastest on one thread, and the suite must not fight itself for 2 cores.
torch.set_num_threads(1)

from emofuse.core.types import AUDIO, FEATURES, METADATA, MODALITIES, TEXT, VIDEO, Batch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent")
    return SHARED_DATA


def make_batch(batch_size: int = 3, *, seed: int = 0, frames: int = 8, size: int = 224, audio_s: float = 1.0,
               num_classes: int = 7, missing: dict[str, list[int]] | None = None) -> Batch:
    """A batch with every modality filled with random (shape-correct) values.

    `missing` maps a modality to the sample indices where it is absent (zeros, present False).
    Features carry the RAVDESS table's sets: "au" (35) and "mfcc" (259).
    """
    g = torch.Generator().manual_seed(seed)
    n_audio = int(16_000 * audio_s)
    lengths = torch.tensor([n_audio - 1600 * i for i in range(batch_size)]).clamp(min=1600)
    audio = torch.randn(batch_size, n_audio, generator=g) * 0.1
    for i, n in enumerate(lengths):
        audio[i, n:] = 0
    texts = ["Kids are talking by the door", "Dogs are sitting by the door", "I can't believe it!"]
    batch = Batch(
        ids=[f"clip{i}" for i in range(batch_size)],
        labels=torch.arange(batch_size) % num_classes,
        present={m: torch.ones(batch_size, dtype=torch.bool) for m in MODALITIES},
        video=torch.randn(batch_size, frames, 3, size, size, generator=g),
        audio=audio,
        audio_lengths=lengths,
        text=[texts[i % len(texts)] for i in range(batch_size)],
        age=torch.tensor([25.0 + 10 * i for i in range(batch_size)]),
        gender=torch.tensor([1 + i % 2 for i in range(batch_size)]),
        speakers=[f"spk{i % 2}" for i in range(batch_size)],
        features={"au": torch.rand(batch_size, 35, generator=g), "mfcc": torch.randn(batch_size, 259, generator=g)},
        extra={"keys": [f"key{i}" for i in range(batch_size)]},
    )
    for modality, idx in (missing or {}).items():
        for i in idx:
            batch.present[modality][i] = False
            if modality == VIDEO:
                batch.video[i] = 0
            elif modality == AUDIO:
                batch.audio[i] = 0
            elif modality == TEXT:
                batch.text[i] = ""
            elif modality == FEATURES:
                for v in batch.features.values():
                    v[i] = 0
            elif modality == METADATA:
                batch.age[i] = float("nan")
                batch.gender[i] = 0
    return batch


@pytest.fixture
def batch_factory():
    return make_batch
