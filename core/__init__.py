"""The emofuse kernel and its public plugin API.

A plugin imports from here and nowhere else in emofuse: the names in `__all__` are stable within a
major `API_VERSION` (a change that breaks a plugin raises it; additions raise the minor number).
Everything in sub-packages (``emofuse.core.data``, ``.engine``, ``.apps``) and in modules not listed
here is private and may change at any release. The guide: ``docs/plugins.md``.
"""
from emofuse.core.component import Component, ComponentConfig
from emofuse.core.errors import CheckpointError, ConfigError, DataError, EmofuseError, PluginError
from emofuse.core.hookspecs import hookimpl
from emofuse.core.interfaces import (
    BranchInfo,
    DatasetReader,
    DatasetReaderConfig,
    Encoder,
    Fusion,
    Loss,
    collate_extracted,
)
from emofuse.core.types import (
    AUDIO,
    FEATURES,
    GENDER_CODES,
    METADATA,
    METADATA_DIM,
    MODALITIES,
    TEXT,
    VIDEO,
    Batch,
    EncoderOutput,
    Sample,
    gender_code,
    lengths_to_mask,
    pad_sequences,
)

#: Version of the plugin API (the names below and the hooks in `emofuse.core.hookspecs`).
API_VERSION = "1.1"

__all__ = [
    "API_VERSION",
    # hooks
    "hookimpl",
    # the interfaces a plugin implements
    "Component", "ComponentConfig", "Encoder", "Fusion", "Loss", "DatasetReader", "DatasetReaderConfig",
    # data that travels through them
    "Sample", "Batch", "EncoderOutput", "BranchInfo",
    "VIDEO", "AUDIO", "TEXT", "METADATA", "FEATURES", "MODALITIES", "METADATA_DIM", "GENDER_CODES",
    # helpers
    "gender_code", "pad_sequences", "lengths_to_mask", "collate_extracted",
    # errors a component raises for input a user can fix
    "EmofuseError", "ConfigError", "DataError", "PluginError", "CheckpointError",
]
