"""Frozen branches' outputs over a split, computed once and cached: what the fusion stage trains on."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from emofuse.core.engine.distributed import (
    DistContext,
)
from emofuse.core.engine.encode import encoder_output
from emofuse.core.engine.loaders import light_modalities, split_batches
from emofuse.core.engine.progress import reporter
from emofuse.core.interfaces import Encoder
from emofuse.core.types import EncoderOutput


@dataclass
class BranchOutputs:
    """One split's frozen branch outputs, aligned by sample: what the fusion trains on."""

    ids: list[str]
    labels: torch.Tensor
    logits: dict[str, torch.Tensor]
    embedding: dict[str, torch.Tensor | None]
    present: dict[str, torch.Tensor]

    def take(self, index: torch.Tensor) -> "BranchOutputs":
        """The rows at `index` (a 1-d long tensor), in that order."""
        return BranchOutputs(
            ids=[self.ids[i] for i in index.tolist()],
            labels=self.labels[index],
            logits={b: t[index] for b, t in self.logits.items()},
            embedding={b: (t[index] if t is not None else None) for b, t in self.embedding.items()},
            present={b: t[index] for b, t in self.present.items()},
        )

    def __len__(self) -> int:
        return len(self.ids)

    def select(self, index: torch.Tensor, branches: Sequence[str], device: torch.device) -> dict[str, EncoderOutput]:
        """The rows at `index` of each of `branches`, as a fusion takes them (by branch name)."""
        out = {}
        for b in branches:
            emb = self.embedding[b]
            out[b] = EncoderOutput(
                logits=self.logits[b][index].to(device),
                embedding=emb[index].to(device) if emb is not None else None,
                present=self.present[b][index].to(device),
            )
        return out


def outputs_namespace(branch: str, encoder: Encoder, checkpoint_sha: str) -> str:
    from emofuse.core.data.cache import describe, encoder_namespace

    inputs = encoder_namespace(encoder)
    namespace = f"outputs-{branch}-{inputs}-{checkpoint_sha[:12]}"
    describe(namespace, {"component": f"branch outputs {branch!r} of encoder {encoder.name!r}", "name": encoder.name,
                         "inputs": inputs, "checkpoint_sha256": checkpoint_sha})
    return namespace


def compute_branch_outputs(
    encoders: Mapping[str, Encoder], checkpoint_sha: Mapping[str, str], bundle: Any, cache: Any, *, split: str,
    batch_size: int, seed: int, num_workers: int, ctx: DistContext, progress: bool,
) -> BranchOutputs:
    """Every frozen branch's outputs over `split`, from the cache where it has them, else computed
    once (backbone features from the feature cache) and stored."""
    from emofuse.core.data.cache import batch_keys

    order = [s.id for s in bundle.splits[split]]
    position = {sid: i for i, sid in enumerate(order)}
    n = len(order)
    labels = torch.full((n,), -1, dtype=torch.long)
    seen = torch.zeros(n, dtype=torch.bool)
    logits: dict[str, torch.Tensor] = {}
    embedding: dict[str, torch.Tensor | None] = {}
    present: dict[str, torch.Tensor] = {}
    alone = DistContext(device=ctx.device)
    for name, encoder in encoders.items():
        encoder.eval()
        namespace = outputs_namespace(name, encoder, checkpoint_sha[name])
        rows: dict[int, dict[str, torch.Tensor]] = {}
        loader = split_batches(bundle, split, modalities=light_modalities(encoder), batch_size=batch_size,
                               shuffle=False, seed=seed, epoch=0, ctx=alone, num_workers=num_workers)
        with reporter(progress).steps(f"branch {name}: outputs on {split}", len(loader)) as tick, torch.no_grad():
            for batch in loader:
                keys = batch_keys(batch, encoder.modalities)
                for i, sid in enumerate(batch.ids):
                    labels[position[sid]] = int(batch.labels[i])
                    seen[position[sid]] = True
                values = cache.get_many(namespace, keys)
                if any(v is None for v in values):  # score the batch once and keep its outputs
                    batch = batch.to(ctx.device)
                    out = encoder_output(encoder, batch, cache)
                    present_b = out.presence()
                    values = []
                    for i in range(len(batch)):
                        v = {"logits": out.logits[i].float().cpu(), "present": present_b[i].cpu().to(torch.uint8)}
                        if out.embedding is not None:
                            v["embedding"] = out.embedding[i].float().cpu()
                        values.append(v)
                    cache.put_many(namespace, keys, values)
                rows.update({position[sid]: v for sid, v in zip(batch.ids, values)})
                tick()
        num_classes = encoder.num_classes
        logits[name] = torch.zeros(n, num_classes)
        present[name] = torch.zeros(n, dtype=torch.bool)
        has_emb = any("embedding" in v for v in rows.values())
        embedding[name] = torch.zeros(n, encoder.embedding_dim) if has_emb else None
        for i, v in rows.items():
            logits[name][i] = v["logits"]
            present[name][i] = bool(v["present"])
            if has_emb and "embedding" in v:
                embedding[name][i] = v["embedding"]  # type: ignore[index]
    keep = seen.nonzero().squeeze(1)  # clips no branch could load (skipped as bad) are left out
    return BranchOutputs(ids=order, labels=labels, logits=logits, embedding=embedding, present=present).take(keep)

