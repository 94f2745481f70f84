"""The import contracts in pyproject.toml (`lint-imports`): plugins use the public API alone, the
layers of the design import one way, and only the CLI draws for a terminal. CI runs the test suite,
so this keeps them."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _contracts() -> dict[str, dict]:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    return {c["id"]: c for c in config["contracts"]}


def test_every_import_contract_is_kept():
    result = _lint(REPO / "pyproject.toml", cwd=REPO)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_the_kernel_contract_names_every_kernel_module():
    """A new top-level module of `core/` is kernel, so the kernel's contract must cover it."""
    kernel = {f"emofuse.core.{p.stem}" for p in (REPO / "core").glob("*.py") if p.stem != "__init__"}
    contracts = _contracts()
    assert set(contracts["kernel"]["source_modules"]) == kernel
    assert kernel <= set(contracts["apps-print-nothing"]["source_modules"])


def _lint(config: Path, *contract_ids: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    ids = [arg for cid in contract_ids for arg in ("--contract", cid)]
    return subprocess.run([str(LINT_IMPORTS), str(config), "--no-cache", *ids], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env=env)


def test_a_plugin_importing_a_private_module_breaks_the_contract(tmp_path):
    """Not vacuous: on a copy of the package, a plugin module importing engine code is reported."""
    package = tmp_path / "emofuse"
    for part in ("core", "plugins", "cli"):
        shutil.copytree(REPO / part, package / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "__init__.py", package / "__init__.py")
    (package / "plugins" / "probe.py").write_text("from emofuse.core.engine.class_balance import class_weight_vector\n")
    result = _lint(REPO / "pyproject.toml", "plugins-public-api", cwd=tmp_path,
                   env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert result.returncode != 0
    assert "emofuse.plugins.probe -> emofuse.core.engine.class_balance" in result.stdout
