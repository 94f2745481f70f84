"""The search space of `emofuse search`: which config keys a study tunes, and over what ranges.

A run config's ``[search]`` table maps a dotted key path to a spec, e.g.::

    [search]
    "fusion_train.lr" = { type = "float", low = 1e-5, high = 1e-3, log = true }
    "fusion_train.batch_size" = { type = "categorical", choices = [4, 6, 8] }
    "fusion.init_weights" = { type = "share", branch = "video", low = 0.3, high = 0.8 }
    "loss.gamma" = { type = "float", low = 0.5, high = 4.0, when = { "loss.name" = "focal" } }

Spec types: ``float`` (low, high, log, step), ``int`` (low, high, log, step), ``categorical``
(choices), and ``share``: one branch's weight w in [low, high], the other branches splitting 1 - w
evenly, written as a list in the config's branch order (what the late fusions' ``init_weights`` take).
``when`` makes a spec conditional on other keys of the trial's config (define-by-run: a spec sees
the values of the specs listed before it), so a space can say "gamma only when the loss is focal".
Every key is applied to the config dict and the result re-validated, so any key can be searched.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Mapping, Protocol, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from emofuse.core.config import RunConfig, set_path as set_config_path
from emofuse.core.errors import ConfigError
from emofuse.core.registry import Registry, get_registry

Scalar = Union[bool, int, float, str, None]

#: The option a fusion takes for its initial branch weights (a list, in the config's branch order).
INIT_WEIGHTS_OPTION = "init_weights"
#: The reference design's video-branch weight range.
VIDEO_WEIGHT_RANGE = (0.3, 0.8)
VIDEO_BRANCH = "video"


class _SpecBase(BaseModel):
    model_config = ConfigDict(extra="forbid")
    #: Search this key only when every ``path: value`` here holds in the trial's config.
    when: dict[str, Any] = Field(default_factory=dict)


class FloatSpec(_SpecBase):
    type: Literal["float"]
    low: float
    high: float
    log: bool = False
    step: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _range(self) -> "FloatSpec":
        _check_range(self.low, self.high, self.log)
        if self.log and self.step is not None:
            raise ValueError("step and log cannot be combined")
        return self


class IntSpec(_SpecBase):
    type: Literal["int"]
    low: int
    high: int
    log: bool = False
    step: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _range(self) -> "IntSpec":
        _check_range(self.low, self.high, self.log)
        if self.log and self.step != 1:
            raise ValueError("step and log cannot be combined")
        return self


class CategoricalSpec(_SpecBase):
    type: Literal["categorical"]
    choices: list[Scalar] = Field(min_length=1)

    @model_validator(mode="after")
    def _distinct(self) -> "CategoricalSpec":
        if len({repr(c) for c in self.choices}) != len(self.choices):
            raise ValueError(f"choices {self.choices} repeat a value")
        return self


class ShareSpec(_SpecBase):
    type: Literal["share"]
    branch: str = Field(min_length=1)
    low: float = Field(0.0, ge=0.0, le=1.0)
    high: float = Field(1.0, ge=0.0, le=1.0)
    step: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _range(self) -> "ShareSpec":
        _check_range(self.low, self.high, False)
        return self


Spec = Annotated[Union[FloatSpec, IntSpec, CategoricalSpec, ShareSpec], Field(discriminator="type")]
_SPEC = TypeAdapter(Spec)


def _spec_error(err: ValidationError, where: str) -> str:
    """One line per problem, its key path without the union's type tag (``search.train.lr.low: ...``)."""
    tags = {"float", "int", "categorical", "share"}
    parts = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        if loc and loc[0] in tags:
            loc = loc[1:]
        parts.append(f"{'.'.join([where, *loc])}: {e['msg']}")
    return "; ".join(parts)


def _check_range(low: float, high: float, log: bool) -> None:
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError("low and high must be finite")
    if low >= high:
        raise ValueError(f"low ({low}) must be below high ({high})")
    if log and low <= 0:
        raise ValueError(f"a log range needs low > 0 (got {low})")


class Suggester(Protocol):
    """What a spec needs from a trial: `optuna.Trial`, `optuna.trial.FixedTrial` or a frozen trial's replay."""

    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False) -> float: ...
    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int: ...
    def suggest_categorical(self, name: str, choices: Any) -> Any: ...


# -- dotted key paths --------------------------------------------------------------------------------
_MISSING = object()


def get_path(config: Mapping[str, Any], path: str, default: Any = _MISSING) -> Any:
    """The value at a dotted `path` of a config dict (`default`, or KeyError, when absent)."""
    node: Any = config
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            if default is _MISSING:
                raise KeyError(path)
            return default
        node = node[part]
    return node


def set_path(config: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """Set a dotted `path` of a config dict to a Python value, creating tables (like `apply_set`)."""
    if not [p for p in path.split(".") if p]:
        raise ConfigError(f"search: empty key path {path!r}")
    return set_config_path(config, path, value, where=f"search.{path}")


# -- the space ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SearchSpace:
    """Validated specs by key path, in the order they are suggested."""

    specs: dict[str, Union[FloatSpec, IntSpec, CategoricalSpec, ShareSpec]]

    @classmethod
    def parse(cls, raw: Mapping[str, Mapping[str, Any]]) -> "SearchSpace":
        """Validate a ``[search]`` table; an error names the key (``search.train.lr: ...``)."""
        if not raw:
            raise ConfigError("search: the search space is empty", hint="add specs under [search] or use the default space")
        specs = {}
        for path, spec in raw.items():
            if not isinstance(spec, Mapping):
                raise ConfigError(f"search.{path}: a spec must be a table such as {{type = \"float\", low = 1e-5, high = 1e-3}}")
            try:
                specs[path] = _SPEC.validate_python(dict(spec))
            except ValidationError as err:
                raise ConfigError(
                    _spec_error(err, f"search.{path}"),
                    hint="types: float/int (low, high, log, step), categorical (choices), share (branch, low, high)",
                ) from None
        return cls(specs)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The specs as plain JSON-able tables (what a config's ``[search]`` holds)."""
        return {path: spec.model_dump(exclude_defaults=True) | {"type": spec.type} for path, spec in self.specs.items()}

    @property
    def paths(self) -> list[str]:
        return list(self.specs)

    def apply(self, trial: Suggester, base: Mapping[str, Any]) -> dict[str, Any]:
        """A copy of config dict `base` with each spec's value drawn from `trial` and set at its path."""
        config = copy.deepcopy(dict(base))
        for path, spec in self.specs.items():
            for key in (path, *spec.when):
                _inherit(config, key)
            if not all(get_path(config, k, _MISSING) == v for k, v in spec.when.items()):
                continue
            set_path(config, path, _suggest(trial, path, spec, config))
        return config

    def corners(self) -> list[dict[str, Any]]:
        """Two parameter sets, every spec at its low end and at its high end (first/last choice)."""
        low: dict[str, Any] = {}
        high: dict[str, Any] = {}
        for path, spec in self.specs.items():
            name = param_name(path, spec)
            if isinstance(spec, CategoricalSpec):
                low[name], high[name] = spec.choices[0], spec.choices[-1]
            else:
                low[name], high[name] = spec.low, spec.high
        return [low, high]


def param_name(path: str, spec: Any) -> str:
    """The Optuna parameter a spec draws: its key path (plus the branch for a share)."""
    return f"{path}.{spec.branch}" if isinstance(spec, ShareSpec) else path


def _suggest(trial: Suggester, path: str, spec: Any, config: Mapping[str, Any]) -> Any:
    name = param_name(path, spec)
    if isinstance(spec, FloatSpec):
        return trial.suggest_float(name, spec.low, spec.high, step=spec.step, log=spec.log)
    if isinstance(spec, IntSpec):
        return trial.suggest_int(name, spec.low, spec.high, step=spec.step, log=spec.log)
    if isinstance(spec, CategoricalSpec):
        return trial.suggest_categorical(name, list(spec.choices))
    branches = list(get_path(config, "branches", {}) or {})
    if spec.branch not in branches or len(branches) < 2:
        raise ConfigError(
            f"search.{path}: a share of branch {spec.branch!r} needs it and at least one other branch "
            f"(branches: {', '.join(branches) or 'none'})"
        )
    weight = trial.suggest_float(name, spec.low, spec.high, step=spec.step)
    rest = (1.0 - weight) / (len(branches) - 1)
    return [weight if b == spec.branch else rest for b in branches]


#: Stage-2 tables that default to their stage-1 counterpart when absent.
INHERITED_TABLES = {"fusion_train": "train", "fusion_loss": "loss"}


def _inherit(config: dict[str, Any], path: str) -> None:
    """`fusion_train` defaults to `train` (and `fusion_loss` to `loss`, where the config has one):
    copy the default in before one of its keys is read or changed, so the rest of it stays."""
    table = path.split(".", 1)[0]
    source = INHERITED_TABLES.get(table)
    if source is not None and table in RunConfig.model_fields and config.get(table) is None:
        config[table] = copy.deepcopy(config.get(source) or {})


# -- the reference design's default space ------------------------------------------------------------
def focal_loss_key(config: RunConfig, scope: str) -> str | None:
    """Where the focal loss's options live for a search of `scope`, or None when they cannot be
    searched there: over frozen branches only a fusion-stage loss (`fusion_loss`) may change, since
    `loss` also trains the branches."""
    if config.fusion is not None and config.fusion_loss is not None:
        return "fusion_loss" if config.fusion_loss.name == "focal" else None
    if scope == "fusion":
        return None
    return "loss" if config.loss.name == "focal" else None


def default_space(config: RunConfig, *, scope: str = "full", registry: Registry | None = None) -> dict[str, dict[str, Any]]:
    """The reference design's space for `config`: learning rate 1e-5..1e-3 (log), batch size 4/6/8,
    the video branch's initial weight 0.3..0.8 (when the fusion takes `init_weights` and the config
    has a video branch and another), and focal alpha/gamma (when the loss is focal).

    With `scope` ``"fusion"`` (trials over frozen branches) the keys are the fusion stage's:
    ``fusion_train.*``, ``fusion.*`` and the fusion-stage loss.
    """
    registry = registry or get_registry()
    train_key = "fusion_train" if scope == "fusion" else "train"
    space: dict[str, dict[str, Any]] = {
        f"{train_key}.lr": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True},
        f"{train_key}.batch_size": {"type": "categorical", "choices": [4, 6, 8]},
    }
    if config.fusion is not None and VIDEO_BRANCH in config.branches and len(config.branches) >= 2:
        fusion_cls = registry.cls("fusion", config.fusion.name)
        if INIT_WEIGHTS_OPTION in fusion_cls.Config.model_fields:
            low, high = VIDEO_WEIGHT_RANGE
            space[f"fusion.{INIT_WEIGHTS_OPTION}"] = {"type": "share", "branch": VIDEO_BRANCH, "low": low, "high": high}
    loss_key = focal_loss_key(config, scope)
    if loss_key is not None:
        fields = registry.cls("loss", "focal").Config.model_fields
        focal = {f"{loss_key}.name": "focal"}
        if "alpha" in fields:
            space[f"{loss_key}.alpha"] = {"type": "float", "low": 0.1, "high": 1.0, "when": focal}
        if "gamma" in fields:
            space[f"{loss_key}.gamma"] = {"type": "float", "low": 0.5, "high": 4.0, "when": focal}
    return space
