"""The plugin hooks: one per component kind. A plugin module implements any of them with
`@emofuse.core.hookspecs.hookimpl` and is advertised under the ``emofuse`` entry-point group.

Built-in components use these very hooks through the same entry points as a third party does.
"""
from __future__ import annotations

import pluggy

PROJECT = "emofuse"
ENTRY_POINT_GROUP = "emofuse"
#: Comma-separated entry-point or distribution names: load only these plugins.
ALLOW_ENV = "EMOFUSE_PLUGINS"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_encoders():
    """Return a list of `emofuse.core.interfaces.Encoder` subclasses (branch models)."""


@hookspec
def register_fusions():
    """Return a list of `emofuse.core.interfaces.Fusion` subclasses."""


@hookspec
def register_losses():
    """Return a list of `emofuse.core.interfaces.Loss` subclasses."""


@hookspec
def register_datasets():
    """Return a list of `emofuse.core.interfaces.DatasetReader` subclasses."""
