"""One validated run config: which data, which branches, which fusion and loss, how to train.

Sources are layered: a preset from ``registry.toml``, then a TOML file (``--config``), then CLI
flags and ``--set key=value``. Unknown keys and out-of-range values fail with the key's path.
Component options (``fusion.gamma``) are validated by the component that owns them.
"""
from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Mapping

import tomli_w
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from emofuse.core.component import format_validation_error
from emofuse.core.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ComponentRef(BaseModel):
    """A component by registered name plus its options (flat: ``{name = "focal", gamma = 2}``)."""

    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1)

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class VideoConfig(_Strict):
    """How video clips become frames: the face found in each sampled frame, tracked and cropped."""

    #: Face detector ("haar": OpenCV's Haar cascade) or "none": whole frames (an encoder's fixed `face_box` crops them).
    faces: Literal["haar", "none"] = "haar"
    #: Added around each face box, on every side, as a fraction of its side.
    face_margin: float = Field(0.25, ge=0, le=2)
    #: Folder of the face-crop cache; None: $EMOFUSE_CACHE_DIR/face-crops or ~/.cache/emofuse/face-crops.
    crop_cache: Path | None = None
    cache_crops: bool = True


class DataConfig(_Strict):
    dataset: str = "ravdess"
    #: Folder that holds the corpora; None -> ``../shared/data`` beside the project, if it exists.
    data_dir: Path | None = None
    #: Options passed to the dataset reader (root, labels, ...).
    options: dict[str, Any] = Field(default_factory=dict)
    #: speaker: no speaker in two splits (MELD-like own partitions kept); balanced: stratified 70/15/15; given: own.
    split: Literal["speaker", "balanced", "given"] = "speaker"
    #: Seed of the split alone, so training seeds vary while the held-out clips stay the same.
    split_seed: int = 0
    val_fraction: float = Field(0.15, gt=0, lt=0.5)
    #: 0: no test split (a corpus whose own partition lacks one, like MELD's shared train + dev, then
    #: fits on its whole train partition and reports on val).
    test_fraction: float = Field(0.15, ge=0, lt=0.5)
    #: Reuse (or write) the split here so later runs score the same clips.
    split_file: Path | None = None
    on_bad_sample: Literal["error", "skip"] = "error"
    #: Cap on samples (after the split), for quick runs; None keeps all.
    limit: int | None = Field(None, gt=0)
    #: "per-speaker": feature tables and frozen backbones' features standardised per speaker over all the speaker's
    #: clips, test speakers' too: TRANSDUCTIVE (reads unlabelled test clips); single clips then cannot be predicted.
    speaker_normalization: Literal["none", "per-speaker"] = "none"
    video: VideoConfig = Field(default_factory=VideoConfig)


class TrainConfig(_Strict):
    epochs: int = Field(30, ge=1, le=10_000)
    batch_size: int = Field(16, ge=1, le=4096)
    lr: float = Field(1e-3, gt=0, le=1.0)
    weight_decay: float = Field(1e-4, ge=0, le=1.0)
    #: Fraction of optimizer steps spent warming the learning rate up.
    warmup_fraction: float = Field(0.1, ge=0, lt=1)
    #: How the learning rate falls to zero after the warm-up: along a cosine, or a straight line (transformers' default).
    lr_decay: Literal["cosine", "linear"] = "cosine"
    grad_accumulation: int = Field(1, ge=1, le=1024)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    patience: int = Field(10, ge=1)
    monitor: Literal["accuracy", "macro_f1", "weighted_f1", "loss"] = "accuracy"
    seed: int = 0
    device: str = "auto"
    num_workers: int = Field(0, ge=0, le=64)
    max_grad_norm: float | None = Field(1.0, gt=0)
    #: Cap on a branch's training batches per epoch, each epoch a fresh shuffled share of train (the schedule is
    #: sized to match): fine-tuning a pretrained encoder within a CPU budget. None: whole epochs.
    steps_per_epoch: int | None = Field(None, ge=1)
    #: Batch training clips of similar length (text or audio), so less compute goes to padding.
    group_by_length: bool = False
    #: Train again on train + validation for the epochs early stopping chose (`emofuse.core.engine.refit`).
    refit: bool = False
    #: Which weights a run keeps: its best validation epoch's, or the last epoch's (a refit, whose val clips train).
    keep: Literal["best", "last"] = "best"


def folder_name(v: str, what: str = "run name") -> str:
    """`v`, a folder under the output folder (a run, a study): one absolute or climbing out with ``..`` would write
    elsewhere (a config file from someone else could point it at any folder)."""
    if not v.strip() or Path(v).is_absolute() or not Path(v).parts or any(p in ("..", ".") for p in Path(v).parts):
        raise ValueError(f"{what} {v!r} must be a folder name inside the output folder "
                         "(no absolute path, no '.' or '..')")
    return v


class RunConfig(_Strict):
    """Everything one run needs; what a checkpoint's sidecar stores."""

    name: Annotated[str, AfterValidator(folder_name)] = "run"
    preset: str | None = None
    data: DataConfig = Field(default_factory=DataConfig)
    #: branch name -> encoder; one branch trains alone, several are fused.
    branches: dict[str, ComponentRef] = Field(default_factory=dict)
    fusion: ComponentRef | None = None
    loss: ComponentRef = Field(default_factory=lambda: ComponentRef(name="cross-entropy"))
    train: TrainConfig = Field(default_factory=TrainConfig)
    #: Per-branch overrides of `train` for stage 1 (``[branch_train.audio_text] lr = 3e-4``).
    branch_train: dict[str, dict[str, Any]] = Field(default_factory=dict)
    #: Train settings for the fusion stage (defaults to `train`).
    fusion_train: TrainConfig | None = None
    #: Loss of the fusion stage (defaults to `loss`): the reference trains the fusion with focal loss.
    fusion_loss: ComponentRef | None = None
    #: What the fusion learns from on the training split: the branches' own outputs ("in-sample",
    #: overconfident where a branch overfits) or those of branch copies trained without the clip's
    #: speakers ("out-of-fold": `fusion_folds` more trainings per branch), see `emofuse.core.engine.cross_fitting`.
    fusion_inputs: Literal["in-sample", "out-of-fold"] = "in-sample"
    fusion_folds: int = Field(4, ge=2, le=20)
    output_dir: Path = Path("runs")
    cache_dir: Path | None = None
    #: Optuna search space: key path -> spec, see `emofuse.core.apps.search`.
    search: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("branches")
    @classmethod
    def _branch_names(cls, v: dict[str, ComponentRef]) -> dict[str, ComponentRef]:
        for key in v:
            if not key.replace("_", "").replace("-", "").isalnum():
                raise ValueError(f"branch name {key!r} must be letters, digits, '-' or '_'")
        return v

    @model_validator(mode="after")
    def _fusion_needs_branches(self) -> "RunConfig":
        if self.fusion is not None and len(self.branches) < 1:
            raise ValueError("a fusion needs at least one branch under [branches]")
        unknown = set(self.branch_train) - set(self.branches)
        if unknown:
            raise ValueError(f"branch_train names no configured branch: {sorted(unknown)} (branches: {sorted(self.branches)})")
        for branch, overrides in self.branch_train.items():
            try:
                TrainConfig.model_validate({**self.train.model_dump(), **overrides})
            except ValidationError as err:
                raise ValueError(f"branch_train.{branch}: {format_validation_error(err, '')}") from None
        return self

    def train_for(self, branch: str) -> TrainConfig:
        """Stage-1 settings of `branch`: `train` with that branch's `branch_train` overrides."""
        overrides = self.branch_train.get(branch)
        return TrainConfig.model_validate({**self.train.model_dump(), **overrides}) if overrides else self.train


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Recursively merge `override` into a copy of `base` (tables merge, values replace)."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_value(text: str) -> Any:
    """A `--set` value: TOML/JSON literal when it parses as one (2, 1e-4, true, [1,2], "x"), else a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        pass
    try:
        return json.loads(text)
    except ValueError:
        return text


def set_path(config: dict[str, Any], path: str, value: Any, *, where: str) -> dict[str, Any]:
    """Set the dotted `path` of a config dict to `value`, creating tables as needed; errors start
    with `where` (``--set train.lr``, ``search.train.lr``)."""
    parts = path.split(".")
    if not path or any(not p.strip() for p in parts):
        raise ConfigError(f"{where}: empty key part in {path!r}", hint="write key paths like train.lr")
    node = config
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"{where}: {'.'.join(parts[: i + 1])} is a value, not a table")
        node = nxt
    node[parts[-1]] = copy.deepcopy(value)
    return config


def apply_set(config: dict[str, Any], assignment: str) -> dict[str, Any]:
    """Apply one ``key.path=value`` to a config dict (creating tables as needed)."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key=value, e.g. train.lr=1e-4")
    key, _, raw = assignment.partition("=")
    if not key.strip().strip("."):
        raise ConfigError(f"--set {assignment!r}: empty key")
    return set_path(config, key.strip(), parse_value(raw.strip()), where=f"--set {key.strip()}")


def load_toml(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def _first_path(node: Any, flagged: Callable[[Any], bool], path: str = "") -> str | None:
    """The dotted path (``a.b[2]``) of the first value in a config tree that `flagged` picks, if any."""
    if flagged(node):
        return path or "(top level)"
    if isinstance(node, Mapping):
        children = [(f"{path}.{key}" if path else str(key), value) for key, value in node.items()]
    elif isinstance(node, (list, tuple)):
        children = [(f"{path}[{i}]", value) for i, value in enumerate(node)]
    else:
        return None
    return next((found for child, value in children if (found := _first_path(value, flagged, child))), None)


def validate(raw: Mapping[str, Any], *, source: str = "config") -> RunConfig:
    """Validate a merged config dict; errors name each bad key's path. NaN and infinity are refused everywhere
    (a range check would call NaN "too large"), but an unknown key or one that wants text is told so."""
    try:
        config = RunConfig.model_validate(dict(raw))
    except ValidationError as err:
        raise ConfigError(f"{source}: {format_validation_error(err, '')}") from None
    bad = _first_path(raw, lambda v: isinstance(v, float) and not math.isfinite(v))
    if bad:
        raise ConfigError(f"{source}: {bad}: must be a finite number, not NaN or infinity")
    return config


def to_toml(config: RunConfig) -> str:
    """Serialise a run config as TOML that `load_toml` + `validate` read back unchanged."""
    data = config.model_dump(mode="json", exclude_none=True)
    where = _first_path(data, lambda v: v is None)
    if where:
        raise ConfigError(f"{where}: is None, which a TOML run config cannot hold",
                          hint="leave the key out to get its default, or give a value")
    return tomli_w.dumps(data)
