"""Every built-in component through the shipped conformance kit (`emofuse.core.testing`), exactly as
a third-party plugin's tests run it on theirs; readers read the real data in ../shared/data."""
from __future__ import annotations

from pathlib import Path

from emofuse.core.testing import ConformanceSuite

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


class TestBuiltinComponents(ConformanceSuite):
    distribution = "emofuse"
    data_dir = SHARED_DATA if SHARED_DATA.is_dir() else None
