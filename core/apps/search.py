"""`emofuse search`: tune any composed variant with Optuna, in a study that outlives the process.

- Storage is a real database: a SQLite file under the output folder by default (a study resumes by
  name), or any Optuna storage URL; PostgreSQL lets workers on several machines share one study.
- Trials over frozen branches (a fused config whose space touches only the fusion stage: ``fusion.*``,
  ``fusion_train.*``) train the branches once per study and reuse them, so a trial trains only the
  fusion over cached branch outputs: seconds, not hours. Trials share the run's feature cache.
- Unpromising trials are pruned from their per-epoch validation scores (median or Hyperband).
- A trial killed outright (power, OOM killer) is re-queued by the next run: at once when its worker
  ran on the same machine, else when its heartbeat has been silent for the grace period; one
  interrupted (Ctrl-C, SIGTERM) re-queues itself. Re-queued trials run even when the study already
  holds `--trials` finished ones, so a resumed study loses no trial and repeats none.
- The best trial is exported as a run config `emofuse train --config` accepts, with a summary (best
  value, parameters, importances) printed and written as JSON.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import signal
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Mapping, Protocol

import optuna
from filelock import FileLock
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FixedTrial, FrozenTrial, TrialState
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, ProgrammingError

from emofuse.core.apps.search_space import SearchSpace, default_space, focal_loss_key
from emofuse.core.config import RunConfig, folder_name, to_toml, validate
from emofuse.core.data.cache import process_alive
from emofuse.core.data.code_identity import what_changed
from emofuse.core.engine.run_files import components_code
from emofuse.core.engine import branch_stage, training
from emofuse.core.engine.progress import reporter
from emofuse.core.errors import ConfigError, MissingDependencyError
from emofuse.core.registry import Registry, get_registry

Scope = Literal["auto", "fusion", "full"]
PrunerName = Literal["median", "hyperband", "none"]

#: Key prefixes a trial may change while the branches stay frozen (only the fusion stage retrains).
#: `loss` is not one: it trains the branches too (a fusion-stage `fusion_loss` would be).
FUSION_STAGE_PREFIXES = ("fusion.", "fusion_train.", "fusion_loss.")
#: Config keys that differ between machines of one study and so are not compared on resume.
MACHINE_LOCAL_KEYS = ("name", "output_dir", "cache_dir", "search", "data.data_dir", "data.split_file",
                      "train.device", "train.num_workers", "fusion_train.device", "fusion_train.num_workers")
#: Study user attribute that pins what a study searches, so a resume cannot silently change it.
STUDY_ATTR = "emofuse"
#: Trial user attributes.
ATTR_INTERRUPTED = "interrupted"
ATTR_RETRY_OF = "retry_of"
ATTR_RUN_DIR = "run_dir"
ATTR_WORKER = "worker"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


class Trainer(Protocol):
    """How trials train (`TrainRunTrainer`, over `emofuse.core.engine.training`, by default)."""

    def train(self, config: RunConfig, *, on_epoch: Callable[[int, Mapping[str, float]], None], data: Any,
              branch_checkpoints: Mapping[str, Path] | None) -> Any:
        """Train one config; return an object with ``metrics`` (``{split: {metric: value}}``).

        ``on_epoch(epoch, val_metrics)`` is called after each validated epoch of the last stage and
        may raise `optuna.TrialPruned`. ``branch_checkpoints`` (branch -> checkpoint, from
        `train_branches`; None when every trial trains everything) are the frozen branches the
        trial must fuse, over their cached outputs, instead of training its own.
        """
        ...

    def train_branches(self, config: RunConfig, *, data: Any) -> dict[str, Path]:
        """Train `config`'s branches (stage 1) where trials of `config` will find them, or reuse the
        ones already trained there; return each branch's checkpoint."""
        ...


@dataclass
class SearchOptions:
    """How to run a study; every field has the issue's default."""

    #: Study name in the storage (default: the run config's name).
    study_name: str | None = None
    #: Optuna storage URL (default: ``sqlite:///<output_dir>/search/studies.db``).
    storage: str | None = None
    #: Trials the study should hold when done (complete + pruned, all workers together).
    n_trials: int = 50
    #: Continue a study of that name when it exists; False refuses to touch an existing study.
    resume: bool = True
    #: "fusion": branches trained once, trials retrain the fusion only; "full": every trial trains
    #: everything; "auto": "fusion" when the config is fused and the space allows it.
    scope: Scope = "auto"
    pruner: PrunerName = "median"
    #: Sampler seed; workers sharing a study must use different seeds (or None).
    sampler_seed: int | None = None
    #: Stop this worker after this many seconds (a trial in flight finishes first).
    timeout: float | None = None
    #: Seconds between a running trial's heartbeats; one silent for `grace_period` is re-queued.
    heartbeat_interval: int = 30
    grace_period: int | None = None
    #: Folder for the study's trial runs, summary and best config (default: <output_dir>/search/<study>).
    out_dir: Path | None = None


@dataclass
class SearchResult:
    study_name: str
    storage: str
    monitor: str
    direction: str
    scope: str
    counts: dict[str, int]
    best_number: int | None
    best_value: float | None
    best_params: dict[str, Any]
    importances: dict[str, float] | None
    best_config: RunConfig | None
    best_config_path: Path | None
    summary_path: Path
    summary: dict[str, Any] = field(default_factory=dict)


# -- storage -----------------------------------------------------------------------------------------
def default_storage_path(config: RunConfig) -> Path:
    return Path(config.output_dir) / "search" / "studies.db"


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{Path(path).resolve()}"


def redact(url: str) -> str:
    """A storage URL fit to print: the password hidden."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def normalize_url(url: str) -> str:
    """Check a storage URL; a bare ``postgresql://`` uses psycopg 3 when psycopg2 is not installed."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(f"--storage {url!r}: not a database URL",
                          hint="e.g. sqlite:///runs/search/studies.db or postgresql://user@host/db") from None
    if parsed.drivername in ("postgresql", "postgres"):
        import importlib.util

        parsed = parsed.set(drivername="postgresql")  # SQLAlchemy no longer reads the "postgres" alias
        if importlib.util.find_spec("psycopg2") is None:
            if importlib.util.find_spec("psycopg") is None:
                raise MissingDependencyError("a PostgreSQL storage needs a driver", hint="pip install 'psycopg[binary]'")
            parsed = parsed.set(drivername="postgresql+psycopg")
        return parsed.render_as_string(hide_password=False)
    return url


def _sqlite_file(url: str) -> Path | None:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def _serialize_sqlite_writers(storage: RDBStorage) -> None:
    """Make every SQLite transaction ``BEGIN IMMEDIATE`` in WAL mode.

    SQLite's default deferred transactions take the write lock only at their first write; two
    processes that both read and then write deadlock, and SQLite answers one of them "database is
    locked" at once, whatever the busy timeout. Taking the write lock up front makes writers queue
    (up to the busy timeout) instead; WAL lets readers proceed while one writes. (WAL needs a local
    file system: for workers on several machines use a server database.)
    """
    engine = storage.engine

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # let SQLAlchemy's begin event below open transactions
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: no corruption on a crash, one fsync per checkpoint
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened while the storage set itself up lack the settings


def open_storage(url: str, *, heartbeat_interval: int = 30, grace_period: int | None = None) -> RDBStorage:
    """An Optuna RDB storage with heartbeats (stale trials are failed and re-queued).

    SQLite files get a 60 s busy timeout and serialized writers; server databases a pre-ping so a
    connection dropped during a long trial is replaced rather than failing the trial.
    """
    url = normalize_url(url)
    sqlite_file = _sqlite_file(url)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        kwargs: dict[str, Any] = dict(
            heartbeat_interval=heartbeat_interval,
            grace_period=grace_period or 3 * heartbeat_interval,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3),
        )
        if sqlite_file is not None:
            sqlite_file.parent.mkdir(parents=True, exist_ok=True)
            # Table creation is not atomic in SQLite: one process at a time sets a new file up.
            with FileLock(str(sqlite_file) + ".lock"):
                storage = RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}}, **kwargs)
            _serialize_sqlite_writers(storage)
            return storage
        for attempt in range(5):
            try:
                return RDBStorage(url, engine_kwargs={"pool_pre_ping": True}, **kwargs)
            except ImportError as exc:
                raise MissingDependencyError(f"--storage {redact(url)}: {exc}", hint="install the database driver") from None
            except (IntegrityError, ProgrammingError):
                # Workers starting together on a fresh database race to create Optuna's tables (and,
                # in PostgreSQL, its enum types); the loser finds them made and carries on.
                if attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")


# -- one study ---------------------------------------------------------------------------------------
def monitor_of(config: RunConfig) -> str:
    """The validation metric trials are ranked by: the last stage's `monitor`."""
    stage = config.fusion_train if (config.fusion is not None and config.fusion_train is not None) else config.train
    return stage.monitor


def resolve_scope(config: RunConfig, space_paths: list[str], scope: Scope) -> str:
    """'fusion' when trials may reuse frozen branches, else 'full'; a bad explicit choice is an error."""
    outside = [p for p in space_paths if not p.startswith(FUSION_STAGE_PREFIXES)]
    if scope == "full":
        return "full"
    if config.fusion is None:
        if scope == "fusion":
            raise ConfigError("--scope fusion needs a fused config", hint="add a fusion (--fusion NAME) or use --scope full")
        return "full"
    if outside:
        if scope == "fusion":
            raise ConfigError(
                f"search: {', '.join(outside)} change the branches, which --scope fusion keeps frozen",
                hint="search fusion_train.* (the fusion stage's training) instead, or use --scope full",
            )
        return "full"
    return "fusion"


def _fingerprint(config: RunConfig) -> dict[str, Any]:
    raw = config.model_dump(mode="json")
    for key in MACHINE_LOCAL_KEYS:
        *parents, last = key.split(".")
        node = raw
        for p in parents:
            node = node.get(p) or {}
        if isinstance(node, dict):
            node.pop(last, None)
    return raw


def check_components(config: RunConfig, registry: Registry) -> None:
    """Validate every component's options, as composing the model would, without building anything."""
    for branch, ref in config.branches.items():
        registry.cls("encoder", ref.name).make_config(ref.options, where=f"branches.{branch}")
    if config.fusion is not None:
        registry.cls("fusion", config.fusion.name).make_config(config.fusion.options, where="fusion")
    registry.cls("loss", config.loss.name).make_config(config.loss.options, where="loss")


def materialize(space: SearchSpace, base: Mapping[str, Any], params: Mapping[str, Any] | optuna.Trial,
                *, source: str) -> RunConfig:
    """The run config a trial (or a fixed parameter set) describes, validated."""
    trial = params if isinstance(params, optuna.Trial) else FixedTrial(dict(params))
    raw = space.apply(trial, base)
    raw["search"] = {}
    return validate(raw, source=source)


def check_space(space: SearchSpace, base: Mapping[str, Any], registry: Registry | None = None) -> None:
    """Every corner of the space must make a valid config: fail now, not at trial 37."""
    for params in space.corners():
        check_components(materialize(space, base, params, source=f"search space at {params}"), registry)


def check_search_table(config: RunConfig, registry: Registry | None = None) -> None:
    """A config's own ``[search]`` table, checked as a study would (`emofuse train --dry-run` and the like):
    each spec's type and range, and every key it sets at both ends of its range."""
    if config.search:
        check_space(SearchSpace.parse(config.search), config.model_dump(mode="json", exclude_none=True), registry)


def sampler_seed(seed: int | None, trials_so_far: int) -> int | None:
    """The sampler's seed for a worker joining a study that holds `trials_so_far` trials.

    A fresh study uses `seed` itself (reproducible); a resumed one a seed derived from it and the
    trial count, since replaying the first run's random stream would draw its parameters again.
    """
    if seed is None or trials_so_far == 0:
        return seed
    return int(hashlib.sha256(f"{seed}:{trials_so_far}".encode()).hexdigest()[:8], 16)


def _make_pruner(name: PrunerName, config: RunConfig) -> optuna.pruners.BasePruner:
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=2)
    if name == "hyperband":
        stage = config.fusion_train or config.train
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(stage.epochs, 3), reduction_factor=3)
    return optuna.pruners.NopPruner()


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a scheduler stopping the job) ends the trial like Ctrl-C, so it re-queues itself."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class TrainRunTrainer:
    """The real trainer: `emofuse.core.engine.training.train_run`, the data loaded once for every trial.

    Stage-1 runs live in ``<output_dir>/branches/<branch>-<fingerprint>`` and a fused run reuses a
    finished one with its fingerprint, so trials that share an output folder and leave the keys
    that shape the branches alone all fuse the same frozen branches.
    """

    def __init__(self, registry: Registry, *, progress: bool = True):
        self.registry = registry
        #: Show stage 1's progress (it may take long); trials themselves report one line each.
        self.progress = progress

    def train(self, config: RunConfig, *, on_epoch: Callable, data: Any,
              branch_checkpoints: Mapping[str, Path] | None) -> Any:

        result = training.train_run(config, registry=self.registry, resume=True, progress=False,
                                    on_epoch=on_epoch, data=data)
        for branch, expected in (branch_checkpoints or {}).items():
            got = result.branch_results[branch].checkpoint
            if Path(got).resolve() != Path(expected).resolve():
                raise ConfigError(f"trial {config.name} retrained branch {branch!r} ({got}) instead of reusing {expected}",
                                  hint="the search space changes a key that shapes the branches; use --scope full")
        return result

    def train_branches(self, config: RunConfig, *, data: Any) -> dict[str, Path]:

        checkpoints = {}
        for branch in config.branches:
            branch_config = branch_stage.branch_run_config(config, branch)
            result = training.train_run(branch_config, registry=self.registry, resume=True, progress=self.progress,
                                        data=data)
            checkpoints[branch] = Path(result.checkpoint)
        return checkpoints


class Study:
    """One named study over one base config: opens (or resumes) it, runs trials, summarises."""

    def __init__(self, config: RunConfig, options: SearchOptions | None = None, *, registry: Registry | None = None,
                 trainer: Trainer | None = None, data: Any = None):
        self.config = config
        self.options = options or SearchOptions()
        if self.options.n_trials < 1:
            raise ConfigError(f"--trials {self.options.n_trials}: a study needs at least one trial")
        self.registry = registry or get_registry()
        self.name = self.options.study_name or config.name
        try:  # the study's folder is <output>/search/<study>: the name must not lead out of it
            folder_name(self.name, "--study")
        except ValueError as exc:
            raise ConfigError(str(exc), hint="choose a study name without '..' or a leading '/'") from None
        raw_space = config.search or None
        self.scope = resolve_scope(config, list(raw_space or {}), self.options.scope)
        self.notes: list[str] = []
        if raw_space is None:
            raw_space = default_space(config, scope=self.scope, registry=self.registry)
            if config.loss.name == "focal" and focal_loss_key(config, self.scope) is None:
                self.notes.append("focal alpha/gamma are not searched over frozen branches: `loss` also trains the "
                                  "branches (search them with --scope full, at the cost of retraining every trial)")
        self.space = SearchSpace.parse(raw_space)
        self.monitor = monitor_of(config)
        self.direction = "minimize" if self.monitor == "loss" else "maximize"
        self.out_dir = Path(self.options.out_dir or Path(config.output_dir) / "search" / self.name)
        self.base = config.model_dump(mode="json", exclude_none=True)
        self.base.pop("search", None)
        # Trials run in the study folder but read the run's feature cache: frozen backbones never rerun.
        self.trial_base = {**copy.deepcopy(self.base), "output_dir": str(self.out_dir / "trials"),
                           "cache_dir": str(config.cache_dir or Path(config.output_dir) / ".cache")}
        self.trainer = trainer or TrainRunTrainer(self.registry)
        self.data = data
        self._check_space()
        url = self.options.storage or sqlite_url(default_storage_path(config))
        self.storage_url = redact(url)
        self.storage = open_storage(url, heartbeat_interval=self.options.heartbeat_interval,
                                    grace_period=self.options.grace_period)
        self.study = self._open_study()
        self.branch_checkpoints: dict[str, Path] | None = None

    # -- set-up -------------------------------------------------------------------------------
    def _check_space(self) -> None:
        check_space(self.space, self.base, self.registry)

    def _identity(self) -> dict[str, Any]:
        return {"space": self.space.to_dict(), "scope": self.scope, "monitor": self.monitor,
                "config": _fingerprint(self.config), "code": components_code(self.config, self.registry)}

    def _open_study(self) -> optuna.Study:
        exists = self.name in optuna.get_all_study_names(self.storage)
        if exists and not self.options.resume:
            raise ConfigError(
                f"study {self.name!r} already exists in {self.storage_url}",
                hint="resume it (drop --no-resume), or choose another name with --study",
            )
        study = optuna.create_study(storage=self.storage, study_name=self.name, direction=self.direction,
                                    pruner=_make_pruner(self.options.pruner, self.config), load_if_exists=True)
        study.sampler = optuna.samplers.TPESampler(
            seed=sampler_seed(self.options.sampler_seed, len(study.get_trials(deepcopy=False))), constant_liar=True)
        if study.direction.name.lower() != self.direction:
            raise ConfigError(f"study {self.name!r} in {self.storage_url} {study.direction.name.lower()}s its "
                              f"value, this config would {self.direction} {self.monitor}", hint="use another --study")
        identity = json.loads(json.dumps(self._identity()))
        stored = study.user_attrs.get(STUDY_ATTR)
        if stored is None:
            study.set_user_attr(STUDY_ATTR, identity)
        else:
            for component, now in identity["code"].items():
                change = what_changed(component, (stored.get("code") or {}).get(component), now)
                if change:
                    raise ConfigError(
                        f"study {self.name!r} in {self.storage_url}: its trials were run with other code ({change})",
                        hint="start another --study: trials of the old and the new code are not comparable",
                    )
            for key in ("space", "scope", "monitor", "config", "code"):
                if stored.get(key) != identity[key]:
                    raise ConfigError(
                        f"study {self.name!r} in {self.storage_url} was started with a different {key}",
                        hint="resume it with the same preset, config and --set values, or start another --study",
                    )
        return study

    def counts(self) -> dict[str, int]:
        trials = self.study.get_trials(deepcopy=False)
        return {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}

    def recover(self) -> None:
        """Fail trials whose worker died and re-queue them: at once when the worker ran on this machine
        and its process is gone, else once its heartbeat has been silent for the grace period."""
        self._requeue_dead_local_trials()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(self.study)

    def _requeue_dead_local_trials(self) -> None:
        host = os.uname().nodename
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            worker_host, _, pid = str(trial.user_attrs.get(ATTR_WORKER, "")).rpartition(":")
            if worker_host != host or not pid.isdigit() or int(pid) == os.getpid() or process_alive(int(pid)):
                continue
            try:
                self.storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # another worker of this machine failed it first and re-queues it
            self.study.enqueue_trial(trial.params, user_attrs={ATTR_RETRY_OF: trial.number})

    # -- trials -------------------------------------------------------------------------------
    def prepare_branches(self) -> dict[str, Path] | None:
        """In 'fusion' scope, the frozen branches every trial fuses: trained once, then reused."""
        if self.scope != "fusion":
            return None
        if self.branch_checkpoints is None:
            # One worker per machine trains them; the others wait on the lock and reuse its checkpoints.
            self.out_dir.mkdir(parents=True, exist_ok=True)
            config = validate({**self.trial_base, "name": "branches"}, source=f"study {self.name!r}")
            with FileLock(str(self.out_dir / "branches.lock")):
                self.branch_checkpoints = self.trainer.train_branches(config, data=self.data)
        return self.branch_checkpoints

    def objective(self, trial: optuna.Trial) -> float:
        config = self.trial_config(trial)
        step = 0

        def on_epoch(epoch: int, val_metrics: Mapping[str, float]) -> None:
            nonlocal step
            value = val_metrics.get(self.monitor)
            if value is None or not math.isfinite(float(value)):
                return
            trial.report(float(value), step)
            step += 1
            if trial.should_prune():
                raise optuna.TrialPruned(f"{self.monitor} {float(value):.4f} after epoch {epoch}")

        trial.set_user_attr(ATTR_WORKER, f"{os.uname().nodename}:{os.getpid()}")
        trial.set_user_attr(ATTR_RUN_DIR, str(Path(config.output_dir) / config.name))
        try:
            result = self.trainer.train(config, on_epoch=on_epoch, data=self.data, branch_checkpoints=self.branch_checkpoints)
        except KeyboardInterrupt:
            # Ctrl-C or SIGTERM mid-trial: Optuna fails this trial; queue its parameters to run again.
            trial.set_user_attr(ATTR_INTERRUPTED, True)
            self.study.enqueue_trial(trial.params, user_attrs={ATTR_RETRY_OF: trial.number})
            raise
        metrics = result.metrics
        if "val" not in metrics or self.monitor not in metrics["val"]:
            raise ConfigError(f"trial {trial.number}: the run reported no validation {self.monitor}",
                              hint="the data split needs a validation set (data.val_fraction)")
        for split, values in metrics.items():
            trial.set_user_attr(f"metrics.{split}", {k: float(v) for k, v in values.items()})
        return float(metrics["val"][self.monitor])

    def trial_config(self, trial: optuna.Trial | Mapping[str, Any]) -> RunConfig:
        number = trial.number if isinstance(trial, optuna.Trial) else None
        base = copy.deepcopy(self.base)
        if number is not None:
            base = {**copy.deepcopy(self.trial_base), "name": f"trial-{number:04d}"}
        where = f"study {self.name!r} trial {number}" if number is not None else f"study {self.name!r}"
        return materialize(self.space, base, trial, source=where)

    def optimize(self, *, progress: bool = False) -> None:
        """Run trials until the study holds `n_trials` finished ones (this worker's share of them)."""
        self.recover()
        counts = self.counts()
        done = sum(counts[s.name.lower()] for s in FINISHED)
        # Re-queued trials (killed or interrupted ones) run even once the study holds n_trials finished ones.
        target = max(self.options.n_trials, done + counts["waiting"])
        remaining = target - done
        if remaining <= 0:
            return
        self.prepare_branches()
        callbacks: list[Callable[[optuna.Study, FrozenTrial], None]] = [
            optuna.study.MaxTrialsCallback(target, states=FINISHED)
        ]
        if progress:
            callbacks.append(self._report_trial)
        with _sigterm_as_interrupt():
            self.study.optimize(self.objective, n_trials=remaining, timeout=self.options.timeout,
                                callbacks=callbacks, catch=(RuntimeError, FloatingPointError))

    def _report_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        value = "" if trial.value is None else f" {self.monitor}={trial.value:.4f}"
        params = ", ".join(f"{k}={format_value(v)}" for k, v in trial.params.items())
        reporter().status(f"trial {trial.number} {trial.state.name.lower()}{value} ({params})")

    # -- results ------------------------------------------------------------------------------
    def best_trial(self) -> FrozenTrial | None:
        complete = [t for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
        if not complete:
            return None
        return self.study.best_trial

    def importances(self) -> tuple[dict[str, float] | None, str | None]:
        """fANOVA importances of the parameters, or None and why (too few trials, no variation)."""
        complete = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if len(complete) < 2:
            return None, f"{len(complete)} complete trial(s): importances need at least 2"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return dict(optuna.importance.get_param_importances(self.study)), None
        except (RuntimeError, ValueError, ZeroDivisionError) as exc:
            return None, f"importances unavailable: {exc}"

    def summarize(self, *, elapsed_s: float | None = None) -> SearchResult:
        """Write ``summary.json`` (and ``best.toml`` when a trial completed) under the study folder."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        best = self.best_trial()
        importances, importance_note = self.importances()
        best_config = best_path = None
        if best is not None:
            best_config = self.best_config(best)
            best_path = self.out_dir / "best.toml"
            best_path.write_text(to_toml(best_config) + "\n", encoding="utf-8")
        trials = self.study.get_trials(deepcopy=False)
        summary = {
            "study": self.name,
            "storage": self.storage_url,
            "monitor": self.monitor,
            "direction": self.direction,
            "scope": self.scope,
            "target_trials": self.options.n_trials,
            "counts": self.counts(),
            "best": None if best is None else {
                "number": best.number,
                "value": best.value,
                "params": best.params,
                "metrics": {k[len("metrics."):]: v for k, v in best.user_attrs.items() if k.startswith("metrics.")},
                "run_dir": best.user_attrs.get(ATTR_RUN_DIR),
                "config": str(best_path),
            },
            "importances": importances,
            "importance_note": importance_note,
            "notes": self.notes,
            "space": self.space.to_dict(),
            "branch_checkpoints": {k: str(v) for k, v in (self.branch_checkpoints or {}).items()} or None,
            "elapsed_s": elapsed_s,
            "trials": [
                {"number": t.number, "state": t.state.name.lower(), "value": t.value, "params": t.params,
                 "duration_s": t.duration.total_seconds() if t.duration else None,
                 "retry_of": _retry_of(t), "worker": t.user_attrs.get(ATTR_WORKER)}
                for t in trials
            ],
        }
        summary_path = self.out_dir / "summary.json"
        summary_path.write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
        return SearchResult(
            study_name=self.name, storage=self.storage_url, monitor=self.monitor, direction=self.direction,
            scope=self.scope, counts=summary["counts"], best_number=None if best is None else best.number,
            best_value=None if best is None else best.value, best_params={} if best is None else dict(best.params),
            importances=importances, best_config=best_config, best_config_path=best_path,
            summary_path=summary_path, summary=summary,
        )

    def best_config(self, best: FrozenTrial) -> RunConfig:
        """The best trial's config as a standalone run: named after the study, in the base output folder."""
        config = self.trial_config(best.params)
        return config.model_copy(update={"name": f"{self.name}-best", "output_dir": self.config.output_dir})


def _retry_of(trial: FrozenTrial) -> int | None:
    if ATTR_RETRY_OF in trial.user_attrs:
        return int(trial.user_attrs[ATTR_RETRY_OF])
    history = trial.system_attrs.get("retry_history") or []  # set by RetryHeartbeatStaleTrialCallback
    return int(history[-1]) if history else None


def format_value(value: Any) -> str:
    """A parameter value for people: floats to 4 significant digits."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# -- entry points ------------------------------------------------------------------------------------
def run_search(config: RunConfig, options: SearchOptions | None = None, *, registry: Registry | None = None,
               trainer: Trainer | None = None, data: Any = None, progress: bool = False) -> SearchResult:
    """Open (or resume) the study, run its missing trials, export the best config and a summary;
    with `progress`, each finished trial is a note to the progress reporter."""
    started = time.perf_counter()
    study = Study(config, options, registry=registry, trainer=trainer, data=data)
    if study.data is None and trainer is None and not any(p.startswith("data.") for p in study.space.paths):
        study.data = load_search_data(config, study.registry, study.out_dir)
    try:
        study.optimize(progress=progress)
    except KeyboardInterrupt:
        study.summarize(elapsed_s=round(time.perf_counter() - started, 3))  # what is done so far stays readable
        raise
    return study.summarize(elapsed_s=round(time.perf_counter() - started, 3))


def load_search_data(config: RunConfig, registry: Registry, out_dir: Path) -> Any:
    """The data every trial shares, loaded once (the space leaves `data.*` alone); the split is
    written to the study folder."""
    from emofuse.core.data.pipeline import load_data
    from emofuse.core.engine.compose import required_modalities

    return load_data(config.data, required_modalities(config, registry), registry, split_dir=out_dir)


__all__ = ["SearchOptions", "SearchResult", "Study", "run_search", "open_storage", "format_value",
           "default_space", "SearchSpace", "Trainer", "TrainRunTrainer", "load_search_data"]
