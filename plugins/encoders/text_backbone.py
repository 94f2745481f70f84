"""A frozen-by-default BERT-family text encoder with its own tokenizer (default: the packaged MiniLM).

`token_embeddings` gives each text's contextual token vectors, unpadded, so the result for one clip
does not depend on the other clips in its batch (the trainer caches them per clip).
"""
from __future__ import annotations

import torch
from torch import nn

from emofuse.plugins.encoders.pretrained import load_pretrained

DEFAULT_TEXT_BACKBONE = "minilm"


class TextBackbone(nn.Module):
    """Wraps ``AutoModel`` + ``AutoTokenizer``; `name` is a local folder, "minilm" or a hub id
    (e.g. ``bert-base-uncased``)."""

    def __init__(self, name: str = DEFAULT_TEXT_BACKBONE, *, max_length: int = 64, option: str = "text_backbone"):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        common = dict(what="text backbone", option=option, alternative=DEFAULT_TEXT_BACKBONE)
        self.model = load_pretrained(name, AutoModel.from_pretrained, use_safetensors=True, **common)  # never unpickle weights
        self.tokenizer = load_pretrained(name, AutoTokenizer.from_pretrained, **common)
        self.name = name
        self.max_length = max_length
        self.dim = int(self.model.config.hidden_size)

    def token_embeddings(self, texts: list[str], contexts: list[str | None] | None = None, *,
                         context_tokens: int = 0) -> list[torch.Tensor]:
        """One ``[T_i, dim]`` tensor of last-layer token vectors per text (special tokens included).

        With `contexts`, each text is encoded as the first segment of a pair whose second is its context
        (up to `context_tokens` more tokens; the longer segment is cut first), and only the first
        segment's vectors are returned: the text's tokens, having attended to the context.
        """
        device = next(self.model.parameters()).device
        texts = [t or "" for t in texts]
        if contexts is None or all(c is None for c in contexts):
            enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
            lengths = enc["attention_mask"].sum(dim=1).tolist()
        else:
            enc = self.tokenizer(texts, [c or "" for c in contexts], padding=True, truncation="longest_first",
                                 max_length=self.max_length + context_tokens, return_tensors="pt")
            lengths = [first_segment_length(enc, i) for i in range(len(texts))]
        hidden = self.model(**enc.to(device)).last_hidden_state
        return [hidden[i, : int(n)] for i, n in enumerate(lengths)]

    def sentence_embeddings(self, texts: list[str]) -> torch.Tensor:
        """``[B, dim]`` mean of token vectors (the sentence-transformers pooling MiniLM was trained with)."""
        return torch.stack([t.mean(dim=0) for t in self.token_embeddings(texts)])


def first_segment_length(encoding, row: int) -> int:
    """Tokens of a pair encoding's first segment with its special tokens (``[CLS] a [SEP]``, ``<s> a </s>``)."""
    ids = encoding.sequence_ids(row)
    last = max((j for j, s in enumerate(ids) if s == 0), default=0)
    return last + 2


def masked_mean(x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """Mean over dim 1 of ``[B, T, D]`` counting only the first `lengths[b]` positions (all when None)."""
    if lengths is None:
        return x.mean(dim=1)
    mask = (torch.arange(x.shape[1], device=x.device)[None, :] < lengths.to(x.device)[:, None]).to(x.dtype)
    return (x * mask[..., None]).sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp_min(1.0)
