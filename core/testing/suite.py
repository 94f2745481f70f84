"""`ConformanceSuite`: subclass it in a test module and every component of a distribution is tested.

The class parametrizes its own tests (pytest calls a test class's ``pytest_generate_tests``), so
it needs no conftest and no plugin registration: import, subclass, set `distribution`.

It fails closed: a distribution that is not installed (a misspelled name), fails to import, registers
a broken component or registers nothing fails `test_distribution` with the registry's reason, rather
than leaving every other test skipped and the run green.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Mapping

import pytest

from emofuse.core.registry import get_registry
from emofuse.core.testing import checks


class ConformanceSuite:
    """Conformance tests over the components a distribution registers (None: every one installed)."""

    #: Distribution (as pip names it) whose components are checked; None checks every registered one.
    distribution: ClassVar[str | None] = None
    #: Options per component name, for components that need some to build (``{"my-reader": {"path": ...}}``).
    options: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    #: Folder that dataset readers read from (None: readers must find their data from `options`).
    data_dir: ClassVar[Path | None] = None
    #: Branch counts every fusion is checked with.
    fusion_branches: ClassVar[tuple[int, ...]] = (1, 2, 3)

    @classmethod
    def component_names(cls, kind: str) -> list[str]:
        registry = get_registry()
        want = checks.normalise_distribution(cls.distribution) if cls.distribution is not None else None
        return [r.name for r in registry.all()
                if r.kind == kind and (want is None or checks.normalise_distribution(r.provider.distribution) == want)]

    def test_distribution(self) -> None:
        """The distribution loads and registers something (every installed plugin loads, when None)."""
        if self.distribution is not None:
            checks.check_distribution(self.distribution)
        else:
            problems = get_registry().problems
            assert not problems, f"plugins failed to load: {'; '.join(str(p) for p in problems)}"

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        for kind in ("encoder", "fusion", "loss", "dataset"):
            if kind in metafunc.fixturenames:
                names = self.component_names(kind)
                metafunc.parametrize(kind, names or [pytest.param(None, marks=pytest.mark.skip(
                    reason=f"{self.distribution or 'nothing'} registers no {kind}"))])
        if "branches" in metafunc.fixturenames:
            metafunc.parametrize("branches", self.fusion_branches)

    def _options(self, name: str) -> Mapping[str, Any]:
        return self.options.get(name, {})

    def test_encoder(self, encoder: str, tmp_path: Path) -> None:
        checks.check_encoder(encoder, tmp_path, options=self._options(encoder))

    def test_fusion(self, fusion: str, branches: int, tmp_path: Path) -> None:
        checks.check_fusion(fusion, branches, tmp_path, options=self._options(fusion))

    def test_loss(self, loss: str, tmp_path: Path) -> None:
        checks.check_loss(loss, tmp_path, options=self._options(loss))

    def test_dataset(self, dataset: str) -> None:
        cls = get_registry().cls("dataset", dataset)
        required = [k for k, f in cls.Config.model_fields.items() if f.is_required() and k not in self._options(dataset)]
        if required:
            pytest.skip(f"dataset {dataset} needs options {required}: give them in `options`")
        if self.data_dir is None and "root" not in self._options(dataset):
            pytest.skip(f"dataset {dataset}: set `data_dir` or options['{dataset}']['root'] to check it")
        checks.check_dataset(dataset, self.data_dir, options=self._options(dataset))
