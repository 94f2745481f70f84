"""The pytest plugin that installing emofuse registers (entry point ``pytest11``): fixtures for tests of
emofuse components. Importing it costs nothing until a fixture is used."""
from __future__ import annotations

from typing import Any, Callable

import pytest


@pytest.fixture
def emofuse_batch() -> Callable[..., Any]:
    """`emofuse.core.testing.make_batch`: a shape-correct batch with every modality."""
    from emofuse.core.testing.batches import make_batch

    return make_batch


@pytest.fixture
def emofuse_registry() -> Any:
    """The registry of every installed emofuse component."""
    from emofuse.core.registry import get_registry

    return get_registry()
