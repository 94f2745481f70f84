"""Why a clip got its label, as a picture: where the face track sat in each sampled frame, the face
crops the frame CNN saw with its spatial attention over them, and each branch's share of the fused
scores.

`explain_samples` gathers the numbers (`Explanation`), `render_png` draws one clip, `explanation_png`
returns the PNG bytes for one clip (for services), `write_explanations` writes one PNG per clip
(`emofuse predict --explain`, `emofuse evaluate --explain N`). Figures are drawn with matplotlib's
Agg canvas directly (no pyplot state), so several threads may render at once.
"""
from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from emofuse.core.errors import ConfigError, DataError
from emofuse.core.types import VIDEO, Sample

#: Full frames are shown at most this wide or high (pixels).
FRAME_PREVIEW_SIDE = 320


@dataclass
class Explanation:
    """One clip's prediction and what it rests on (arrays are numpy; absent parts are None)."""

    id: str
    path: str | None
    label_names: list[str]
    probabilities: np.ndarray  # [C]
    #: Branch (or constant term) -> its additive share of the final logits [C].
    contributions: dict[str, np.ndarray]
    branch_probabilities: dict[str, np.ndarray] = field(default_factory=dict)
    frames: np.ndarray | None = None  # [T, H, W, 3] uint8, the sampled frames (downscaled)
    boxes: np.ndarray | None = None  # [T, 4] face track, fractions of the frame
    detected: np.ndarray | None = None  # [T] bool
    crops: np.ndarray | None = None  # [T, S, S, 3] uint8, what the frame CNN saw
    attention: np.ndarray | None = None  # [T, h, w], sums to 1 per frame
    attention_branch: str | None = None
    absent: dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.label_names[int(np.argmax(self.probabilities))]


def _crops_of(batch, row: int, spec) -> np.ndarray | None:
    if batch.video is None or not bool(batch.present[VIDEO][row]):
        return None
    mean = torch.tensor(spec.frame_mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.frame_std).view(1, 3, 1, 1)
    rgb = (batch.video[row].cpu().float() * std + mean).clamp(0, 1)
    return (rgb.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def _frames_of(sample: Sample, spec) -> np.ndarray | None:
    """The sampled frames themselves (the same target times the crops come from), small."""
    from emofuse.core.data.decode import sample_frames

    if not sample.video_path:
        return None
    return sample_frames(sample.video_path, num_frames=spec.num_frames).rgb(FRAME_PREVIEW_SIDE)


def explain_samples(predictor: Any, samples: Sequence[Sample]) -> list[Explanation | Any]:
    """An `Explanation` per sample, in order; a clip that cannot be decoded gives a predict `Failure`."""
    from emofuse.core.apps.predict import Failure, _path_of

    results: dict[int, Explanation | Failure] = {}
    for start in range(0, len(samples), predictor.batch_size):
        chunk = list(samples[start:start + predictor.batch_size])
        batch, decoded, bad = predictor.decode_for_explanation(chunk)
        for sample, reason in bad:
            results[id(sample)] = Failure(sample.id, _path_of(sample), reason)
        if batch is None:
            continue
        final, parts, outputs = predictor.branch_contributions(batch)
        probabilities = final.softmax(dim=-1).cpu().numpy()
        with_attention = next(((n, o) for n, o in outputs.items() if "attention" in o.extras), None)
        reasons = batch.extra.get("absent_reasons") or [{}] * len(decoded)
        boxes = batch.extra.get("face_boxes") or [None] * len(decoded)
        detected = batch.extra.get("face_detected") or [None] * len(decoded)
        for row, sample in enumerate(decoded):
            crops = _crops_of(batch, row, predictor.spec)
            attention = None
            if with_attention is not None and crops is not None:
                attention = with_attention[1].extras["attention"][row].float().cpu().numpy()
            results[id(sample)] = Explanation(
                id=sample.id,
                path=_path_of(sample),
                label_names=list(predictor.label_names),
                probabilities=probabilities[row],
                contributions={k: v[row].cpu().numpy() for k, v in parts.items()},
                branch_probabilities={n: o.logits[row].float().softmax(-1).cpu().numpy() for n, o in outputs.items()
                                      if bool(o.presence()[row])},
                frames=_frames_of(sample, predictor.spec) if VIDEO in predictor.modalities and crops is not None else None,
                boxes=boxes[row],
                detected=detected[row],
                crops=crops,
                attention=attention,
                attention_branch=with_attention[0] if attention is not None else None,
                absent=dict(reasons[row]),
            )
    return [results[id(s)] for s in samples]


def _upsample(attention: np.ndarray, size: int) -> np.ndarray:
    """A ``[h, w]`` map to ``[size, size]`` (bilinear), scaled to 0..1 for display."""
    t = torch.from_numpy(attention).float()[None, None]
    up = torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[0, 0].numpy()
    span = up.max() - up.min()
    return (up - up.min()) / span if span > 0 else np.zeros_like(up)


def render_png(explanation: Explanation, *, dpi: int = 80) -> bytes:
    """One clip's explanation as PNG bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    e = explanation
    t = len(e.crops) if e.crops is not None else 0
    columns = max(t, 4)
    picture_rows = 2 if t else 0
    fig = Figure(figsize=(2.0 * columns, 2.2 * picture_rows + 3.2), dpi=dpi)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(picture_rows + 1, columns, height_ratios=[1.0] * picture_rows + [1.5])
    title = f"{e.id}: {e.label} ({e.probabilities.max():.0%})"
    if e.absent:
        title += "   [" + "; ".join(f"{m} missing: {r}" for m, r in e.absent.items()) + "]"
    fig.suptitle(title, fontsize=12)
    for i in range(t):
        ax = fig.add_subplot(grid[0, i])
        ax.set_axis_off()
        if e.frames is not None and i < len(e.frames):
            frame = e.frames[i]
            ax.imshow(frame)
            if e.boxes is not None:
                h, w = frame.shape[:2]
                x0, y0, x1, y1 = e.boxes[i] * np.array([w, h, w, h])
                held = e.detected is not None and not bool(e.detected[i])
                ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, linewidth=2,
                                       edgecolor="orange" if held else "lime", linestyle="--" if held else "-"))
            ax.set_title(f"frame {i + 1}" + (" (box held)" if e.detected is not None and not e.detected[i] else ""),
                         fontsize=8)
        ax = fig.add_subplot(grid[1, i])
        ax.set_axis_off()
        crop = e.crops[i]
        ax.imshow(crop)
        if e.attention is not None:
            ax.imshow(_upsample(e.attention[i], crop.shape[0]), cmap="jet", alpha=0.4, vmin=0, vmax=1)
        if i == 0:
            ax.set_title("face crop" + (f" + {e.attention_branch} attention" if e.attention is not None else ""),
                         fontsize=8, loc="left")
    half = columns // 2
    ax = fig.add_subplot(grid[picture_rows, :half])
    names = e.label_names
    y = np.arange(len(names))
    parts = list(e.contributions.items())
    height = 0.8 / max(1, len(parts))
    for k, (name, values) in enumerate(parts):
        ax.barh(y - 0.4 + (k + 0.5) * height, values, height=height, label=name)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_title("each branch's share of the fused scores (logits)", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    ax = fig.add_subplot(grid[picture_rows, half:])
    best = int(np.argmax(e.probabilities))
    ax.barh(y, e.probabilities, color=["tab:red" if i == best else "tab:gray" for i in range(len(names))],
            label="fused")
    markers = "o^sDv<>"
    for k, (name, probs) in enumerate(e.branch_probabilities.items()):
        ax.plot(probs, y, markers[k % len(markers)], markersize=5, label=f"{name} alone", linestyle="none")
    ax.set_xlim(0, 1)
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_title("probabilities", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def explanation_png(predictor: Any, item: str | Path | Sample, *, text: str | None = None) -> bytes:
    """The explanation PNG of one clip (a media path or a `Sample`); `DataError` when it cannot be read."""
    from emofuse.core.apps.predict import Failure

    entries = predictor.to_samples([item], text=text) if not isinstance(item, Sample) else [item]
    if len(entries) != 1:
        raise ConfigError(f"{item}: explanation_png draws one clip, this names {len(entries)}", hint="pass one media file")
    (entry,) = entries
    if isinstance(entry, Failure):
        raise DataError(entry.path or entry.id, entry.error)
    (result,) = explain_samples(predictor, [entry])
    if isinstance(result, Failure):
        raise DataError(result.path or result.id, result.error)
    return render_png(result)


def _file_name(clip_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", clip_id).strip("._") or "clip"


def write_explanations(predictor: Any, samples: Sequence[Sample], out_dir: str | Path) -> dict[str, Path]:
    """One ``<clip id>.png`` per explainable sample in `out_dir`; returns clip id -> path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for result in explain_samples(predictor, samples):
        if isinstance(result, Explanation):
            path = out / f"{_file_name(result.id)}.png"
            path.write_bytes(render_png(result))
            written[result.id] = path
    return written


__all__ = ["Explanation", "explain_samples", "explanation_png", "render_png", "write_explanations"]
