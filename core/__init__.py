"""The emofuse kernel and its public plugin API.

A plugin imports from here and nowhere else in emofuse (an import-linter contract in pyproject.toml
holds the built-ins to it): the names in `__all__` are stable within a major `API_VERSION` (a change
that breaks a plugin raises it; additions raise the minor number). Everything in sub-packages
(``emofuse.core.data``, ``.engine``, ``.apps``) and in modules not listed here is private and may
change at any release. The guide: ``docs/plugins.md``.

Each name is imported from its home module on first use (PEP 562), so that importing `emofuse.core`
(as the CLI does before it parses) does not import torch.
"""
from importlib import import_module

#: Version of the plugin API (the names below and the hooks in `emofuse.core.hookspecs`).
API_VERSION = "1.2"

#: home module -> the public names it provides
_HOMES = {
    "hookspecs": "hookimpl",
    "component": "Component ComponentConfig",
    "interfaces": "Encoder Fusion Loss DatasetReader DatasetReaderConfig BranchInfo collate_extracted",
    "types": "Sample Batch EncoderOutput VIDEO AUDIO TEXT METADATA FEATURES MODALITIES METADATA_DIM GENDER_CODES "
             "gender_code pad_sequences lengths_to_mask",
    "errors": "EmofuseError ConfigError DataError PluginError CheckpointError MissingDependencyError",
    "config": "ComponentRef",
    "registry": "get_registry",
    # helpers the built-in readers, encoders and losses use (API 1.2)
    "data.corpus": "CorpusReader CorpusReaderConfig files_under",
    "data.tables": "Table read_table is_blank load_feature_table feature_columns row_features",
    "data.dialogue": "DialogueLayout dialogue_layout dialogue_fields group_dialogues",
    "data.decode": "decode_audio",
    "data.user_cache": "user_cache_dir",
    "engine.class_balance": "class_weight_vector log_prior_offsets",
    "engine.compose": "build_encoder",
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names.split()}

__all__ = ["API_VERSION", *_HOME_OF]


def __getattr__(name: str):
    if name not in _HOME_OF:
        raise AttributeError(f"module 'emofuse.core' has no attribute {name!r}")
    value = getattr(import_module(f"emofuse.core.{_HOME_OF[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
