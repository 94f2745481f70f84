"""Sequence models over padded ``[B, L, dim]`` sequences, shared by the encoders that read one (the
audio-text sequence of `mm-lstm`, the transcript's tokens of `text-classifier`)."""
from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from emofuse.core import lengths_to_mask

#: What reads a sequence; "none" (only where an encoder allows it): no sequence model at all.
SequenceModel = Literal["lstm", "transformer", "none"]


def sinusoidal_positions(length: int, dim: int, *, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``[length, dim]`` sine/cosine position codes (Vaswani et al.): no length cap, nothing to learn."""
    position = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    rate = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10_000.0) / dim))
    codes = torch.zeros(length, dim, device=device, dtype=torch.float32)
    codes[:, 0::2] = torch.sin(position * rate)
    codes[:, 1::2] = torch.cos(position * rate[: dim // 2])
    return codes.to(dtype)


class SequenceEncoder(nn.Module):
    """A bidirectional LSTM or transformer encoder layers over a padded ``[B, L, dim]`` sequence.

    Both return ``[B, L, out_dim]`` with zeros on padding, and padding never changes the real
    positions' outputs (packed sequences; a key-padding mask), so the encoder's head is the same
    whichever reads the sequence. The transformer adds sine/cosine positions (it has no order otherwise).
    """

    def __init__(self, kind: SequenceModel, dim: int, *, lstm_hidden: int, lstm_layers: int, transformer_layers: int,
                 heads: int, dropout: float):
        super().__init__()
        self.kind = kind
        if kind == "lstm":
            self.lstm = nn.LSTM(dim, lstm_hidden, num_layers=lstm_layers, batch_first=True, bidirectional=True,
                                dropout=dropout if lstm_layers > 1 else 0.0)
            self.out_dim = 2 * lstm_hidden
        else:
            layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=dropout, batch_first=True,
                                               norm_first=True)
            self.transformer = nn.TransformerEncoder(layer, transformer_layers, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(dim)
            self.out_dim = dim

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        valid = lengths_to_mask(lengths, x.shape[1])
        if self.kind == "lstm":
            packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
            out, _ = pad_packed_sequence(self.lstm(packed)[0], batch_first=True, total_length=x.shape[1])
            return out
        x = x + sinusoidal_positions(x.shape[1], x.shape[2], device=x.device, dtype=x.dtype)[None]
        out = self.norm(self.transformer(x, src_key_padding_mask=~valid))
        return out * valid[..., None].to(out.dtype)
