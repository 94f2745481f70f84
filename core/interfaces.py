"""The four interfaces every plugin implements: `Encoder`, `Fusion`, `Loss`, `DatasetReader`.

The trainer, the CLI and the conformance test know only these; a new component never needs an
edit of the core.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator, Mapping, Sequence

import torch
from torch import nn

from emofuse.core.component import Component, ComponentConfig
from emofuse.core.types import Batch, EncoderOutput, Sample, pad_sequences


class Encoder(Component, nn.Module):
    """A branch model: reads the modalities it declares from a `Batch`, returns class logits.

    An encoder may split into a frozen, cacheable part and a trainable head: `extract` runs the
    frozen backbone and returns per-sample tensors, which the trainer caches on disk
    (`emofuse.core.data.cache`) so a frozen backbone runs once per clip, not once per epoch.
    `forward(batch, extracted)` then runs only the head. Encoders without a frozen part leave
    `extract` returning None.
    """

    kind: ClassVar[str] = "encoder"
    #: Modalities this encoder reads, the primary one (that it cannot do without) first; the data
    #: pipeline decodes only what some encoder asks for.
    modalities: ClassVar[tuple[str, ...]] = ()
    #: Attribute names of frozen pretrained submodules that are rebuilt from their source on load,
    #: so checkpoints need not carry them (they are saved when unfrozen).
    pretrained_modules: ClassVar[tuple[str, ...]] = ()
    #: True for an encoder that reads a dialogue's turns together (a context model): training,
    #: evaluation and prediction then batch whole dialogues (`Batch.dialogue_ids`).
    batches_by_dialogue: bool = False
    #: Learning-rate factor of the unfrozen `pretrained_modules` (fine-tuning gently); 1 = the head's.
    backbone_lr_scale: float = 1.0
    #: Weight in the loss of an auxiliary head's cross-entropy, which the encoder returns as
    #: ``EncoderOutput.extras["aux_logits"]`` ``[B, K]`` and ``["aux_labels"]`` ``[B]`` (-1 unknown); 0 = none.
    aux_weight: float = 0.0

    def __init__(self, config: ComponentConfig, num_classes: int):
        nn.Module.__init__(self)
        self.config = config
        self.num_classes = num_classes
        #: Width of `EncoderOutput.embedding`, 0 when the encoder has none.
        self.embedding_dim = 0

    @classmethod
    def modalities_for(cls, config: ComponentConfig) -> tuple[str, ...]:
        """The modalities an encoder built with `config` reads, primary first. Wrappers (an encoder
        around another) override this to report their inner encoder's."""
        return tuple(cls.modalities)

    def extract(self, batch: Batch) -> list[dict[str, torch.Tensor]] | None:
        """Run the frozen part on a batch; one dict of tensors per sample (first dims may vary)."""
        return None

    def baseline_views(self, extracted: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        """Named narrower readings of one clip's `extract` output that baselines are fit on too (e.g. a
        layered speech backbone's last layer alone: the usual recipe); none by default."""
        return {}

    @property
    def cacheable(self) -> bool:
        """True when `extract` is deterministic and frozen, so its outputs may be cached."""
        return type(self).extract is not Encoder.extract and not self.backbone_trainable

    @property
    def backbone_trainable(self) -> bool:
        """Whether the pretrained part trains (then nothing is cached and it is saved)."""
        return False

    def forward(self, batch: Batch, extracted: dict[str, torch.Tensor] | None = None) -> EncoderOutput:
        """Logits for the batch. `extracted` holds the frozen part's outputs, collated by
        `collate_extracted`, when they come from the cache; the batch then carries no video or audio
        (they were not decoded), so read media only through `extracted_for`."""
        raise NotImplementedError

    def extracted_for(self, batch: Batch, extracted: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """`extracted` when the trainer supplied it from the cache, else computed now."""
        if extracted is not None:
            return extracted
        with torch.set_grad_enabled(self.backbone_trainable and torch.is_grad_enabled()):
            per_sample = self.extract(batch)
        if per_sample is None:
            return {}
        device = batch.labels.device
        return {k: v.to(device) for k, v in collate_extracted(per_sample).items()}

    def fingerprint(self) -> str:
        """Hash of name, options and frozen weights; reuse keys add the code (`data.code_identity`)."""
        h = hashlib.sha256()
        h.update(self.name.encode())
        h.update(json.dumps(self.config.model_dump(mode="json"), sort_keys=True).encode())
        for key, tensor in sorted(self.state_dict().items()):
            if any(key.startswith(m + ".") for m in self.pretrained_modules):
                h.update(key.encode())
                h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint must keep: all but frozen pretrained modules."""
        state = self.state_dict()
        if self.backbone_trainable:
            return state
        return {k: v for k, v in state.items() if not any(k.startswith(m + ".") for m in self.pretrained_modules)}


def collate_extracted(per_sample: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack per-sample extracted tensors. Every key with at least one dimension also gets
    ``<key>_lengths`` ``[B]`` (its per-sample first-dimension sizes), padded to the longest when they
    differ, so an encoder can always read the lengths of a sequence it extracted."""
    if not per_sample:
        return {}
    out: dict[str, torch.Tensor] = {}
    for key in per_sample[0]:
        tensors = [s[key] for s in per_sample]
        if tensors[0].dim() == 0:
            out[key] = torch.stack(tensors)
        else:
            out[key], out[f"{key}_lengths"] = pad_sequences(tensors)
    return out


@dataclass(frozen=True)
class BranchInfo:
    """What a fusion knows of each branch it combines."""

    name: str
    num_classes: int
    embedding_dim: int
    modalities: tuple[str, ...]


class Fusion(Component, nn.Module):
    """Combines any number of branches' outputs into class logits.

    `trainable_parameters()` says what trains (the branches are frozen while a fusion trains);
    `report()` exposes what was learned (weights as shares, biases) for people to read.
    """

    kind: ClassVar[str] = "fusion"
    #: True when the fusion reads `EncoderOutput.embedding`, not only logits.
    uses_embeddings: ClassVar[bool] = False

    def __init__(self, config: ComponentConfig, num_classes: int, branches: Sequence[BranchInfo]):
        nn.Module.__init__(self)
        if not branches:
            raise ValueError("a fusion needs at least one branch")
        self.config, self.num_classes, self.branches = config, num_classes, list(branches)

    def forward(self, outputs: Mapping[str, EncoderOutput]) -> torch.Tensor:
        """Fused logits ``[B, C]`` from every branch's output, keyed by branch name."""
        raise NotImplementedError

    def ordered(self, outputs: Mapping[str, EncoderOutput]) -> list[EncoderOutput]:
        """`outputs` in this fusion's branch order, looked up by name: the order a caller happens to
        hold its branches in can never swap them (as positional inputs once did on reload)."""
        if not isinstance(outputs, Mapping):
            raise TypeError(f"fusion {self.name!r} takes a mapping of branch name -> EncoderOutput, "
                            f"not a {type(outputs).__name__}")
        names = [b.name for b in self.branches]
        if set(outputs) != set(names):
            raise ValueError(f"fusion {self.name!r} was built for branches {names}, got outputs of {sorted(outputs)}")
        return [outputs[n] for n in names]

    def stacked(self, outputs: Mapping[str, EncoderOutput]) -> tuple[torch.Tensor, torch.Tensor]:
        """``([B, N, C]`` logits, absent branches' rows zeroed (NaN included), ``[B, N]`` bool presence)."""
        ordered = self.ordered(outputs)
        present = torch.stack([o.presence() for o in ordered], dim=1)
        logits = torch.stack([o.logits for o in ordered], dim=1)
        zero = torch.zeros((), dtype=logits.dtype, device=logits.device)
        return torch.where(present.unsqueeze(-1), logits, zero), present

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.parameters() if p.requires_grad)

    def report(self) -> dict[str, Any]:
        """Learned quantities worth printing, as plain JSON-able values."""
        return {}

    def contributions(self, outputs: Mapping[str, EncoderOutput]) -> dict[str, torch.Tensor] | None:
        """Each branch's additive share of the fused logits (name -> ``[B, C]``, plus any constant
        term) when the fusion is a sum of per-branch terms; None lets callers measure it instead."""
        return None


class Loss(Component, nn.Module):
    """Maps logits ``[B, C]`` and labels ``[B]`` to a scalar; `class_counts` allows class balancing."""

    kind: ClassVar[str] = "loss"

    def __init__(self, config: ComponentConfig, num_classes: int, class_counts: torch.Tensor | None = None):
        nn.Module.__init__(self)
        self.config, self.num_classes, self.class_counts = config, num_classes, class_counts

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def labelled(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows that carry a label: unlabelled samples (label -1) add no loss."""
        keep = labels >= 0
        return (logits, labels) if bool(keep.all()) else (logits[keep], labels[keep])


class DatasetReaderConfig(ComponentConfig):
    """Options every reader accepts."""

    root: Path | None = None
    #: Explicit label set (order = class index); None keeps the reader's default set.
    labels: list[str] | None = None


class DatasetReader(Component):
    """Yields `Sample`s of one corpus. Readers know nothing of models.

    `default_root` is relative to the data folder (``../shared/data`` by default).
    """

    kind: ClassVar[str] = "dataset"
    Config: ClassVar[type[ComponentConfig]] = DatasetReaderConfig
    default_labels: ClassVar[tuple[str, ...]] = ()
    default_root: ClassVar[str] = ""
    #: Modalities this corpus can provide.
    modalities: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: DatasetReaderConfig, data_dir: Path | None = None):
        self.config = config
        self.data_dir = data_dir
        self.label_names: list[str] = list(config.labels or self.default_labels)

    @property
    def root(self) -> Path:
        if self.config.root is not None:
            return Path(self.config.root)
        if self.data_dir is None:
            raise ValueError(f"dataset {self.name!r} needs a root folder")
        return Path(self.data_dir) / self.default_root

    def samples(self) -> Iterator[Sample]:
        raise NotImplementedError
