"""Security: nothing is ever unpickled, plugins come only from installed entry points, and manifest
media paths stay inside the data root when one is set."""
from __future__ import annotations

import ast
import shutil
import sys
from pathlib import Path

import pytest

from emofuse.core.engine.compose import build_loss
from emofuse.core.config import validate
from emofuse.core.data.pipeline import load_data
from emofuse.core.config import DataConfig
from emofuse.core.errors import ConfigError, DataError, EmofuseError
from emofuse.core.registry import get_registry

REPO = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("core", "plugins", "cli")
#: module -> names that deserialise pickles (or run arbitrary code from a path)
FORBIDDEN_CALLS = {
    "torch": {"load"}, "pickle": {"load", "loads", "Unpickler"}, "cPickle": {"load", "loads"},
    "pandas": {"read_pickle"}, "pd": {"read_pickle"}, "runpy": {"run_path", "run_module"},
    "importlib": {"import_module"}, "util": {"spec_from_file_location"},
}
FORBIDDEN_MODULES = {"pickle", "cPickle", "dill", "joblib", "cloudpickle", "shelve", "marshal", "runpy"}


def _sources() -> list[Path]:
    files = [p for d in SOURCE_DIRS for p in sorted((REPO / d).rglob("*.py"))]
    assert len(files) > 20
    return files


def _violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [f"{where} import {a.name}" for a in node.names if a.name.split(".")[0] in FORBIDDEN_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in FORBIDDEN_MODULES:
            found.append(f"{where} from {node.module} import ...")
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
                if func.attr in FORBIDDEN_CALLS.get(func.value.id, ()) and not _own_module(node):
                    found.append(f"{where} {func.value.id}.{func.attr}(...)")
                if func.value.id in ("np", "numpy") and func.attr == "load":
                    for kw in node.keywords:
                        if kw.arg == "allow_pickle" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                            found.append(f"{where} numpy.load(allow_pickle=...)")
            if isinstance(func, ast.Name) and func.id in ("eval", "exec", "__import__"):
                found.append(f"{where} {func.id}(...)")
    return found


def _own_module(call: ast.Call) -> bool:
    """`import_module` of a literal ``emofuse.`` name (an engine of this package) is not a path from a config."""
    if not call.args:
        return False
    arg = call.args[0]
    head = arg.values[0] if isinstance(arg, ast.JoinedStr) and arg.values else arg
    return isinstance(head, ast.Constant) and isinstance(head.value, str) and head.value.startswith("emofuse.")


def test_no_pickle_loading_or_code_from_paths_in_the_source():
    violations = [v for path in _sources() for v in _violations(path)]
    assert violations == []


def test_the_scanner_sees_what_it_forbids(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import pickle, torch, numpy as np\nimport joblib\nfrom dill import loads\n"
                   "torch.load('m.pt')\npickle.loads(b'')\nnp.load('x.npy', allow_pickle=True)\neval('1')\n")
    hits = _violations_at(bad)
    assert {h.split(" ", 1)[1] for h in hits} >= {"import pickle", "import joblib", "from dill import ...",
                                                   "torch.load(...)", "pickle.loads(...)",
                                                   "numpy.load(allow_pickle=...)", "eval(...)"}


def _violations_at(path: Path) -> list[str]:
    global REPO
    saved, REPO = REPO, path.parent
    try:
        return _violations(path)
    finally:
        REPO = saved


def test_run_config_has_no_way_to_name_a_plugin_path():
    for key in ("plugins", "plugin_path", "plugin_paths", "import", "modules"):
        with pytest.raises(ConfigError, match=key):
            validate({key: ["/tmp/evil.py"]})


@pytest.mark.parametrize("name", ["os.system", "subprocess:run", "evil_probe_module", "evil_probe_module:Loss",
                                  "../evil_probe_module.py"])
def test_a_component_named_like_a_module_is_unknown_and_never_imported(tmp_path, monkeypatch, name):
    marker = tmp_path / "imported"
    (tmp_path / "evil_probe_module.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Loss: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    config = validate({"loss": {"name": name}})
    with pytest.raises(EmofuseError, match="unknown|no loss|known"):
        build_loss(config.loss, 4)
    assert not marker.exists() and "evil_probe_module" not in sys.modules


def test_plugins_come_only_from_entry_points_of_installed_distributions():
    registry = get_registry()
    for item in registry.all():
        assert item.provider.distribution and item.provider.version, item
        assert item.cls.__module__.startswith("emofuse.") or item.provider.distribution != "emofuse"


# -- manifest containment ------------------------------------------------------------------------
@pytest.fixture
def fenced(tmp_path, shared_data):
    root = tmp_path / "root"
    (root / "clips").mkdir(parents=True)
    clip = sorted((shared_data / "ravdess-speech" / "Actor_01").glob("*.ogg"))[0]
    shutil.copy(clip, root / "clips" / "a.ogg")
    shutil.copy(clip, tmp_path / "outside.ogg")
    return root, tmp_path / "outside.ogg"


def _load(root: Path, rows: list[str], *, with_root: bool, skip: bool = False):
    split_dir = root.parent / f"split-{with_root}-{skip}"
    (root / "m.csv").write_text("\n".join(["id,label,speaker,audio", *rows]) + "\n")
    options = {"path": "m.csv", "labels": ["happy", "sad"]}
    if with_root:
        options["root"] = str(root)
    return load_data(DataConfig(dataset="manifest", data_dir=root, split="balanced", options=options,
                                on_bad_sample="skip" if skip else "error"), {"audio"}, split_dir=split_dir)


@pytest.mark.parametrize("escape", ["../outside.ogg", "clips/../../outside.ogg", "ABS"])
def test_manifest_paths_cannot_escape_the_data_root(fenced, escape):
    root, outside = fenced
    path = str(outside) if escape == "ABS" else escape
    rows = [f"c{i},{'happy' if i % 2 else 'sad'},s{i % 3},clips/a.ogg" for i in range(12)]
    with pytest.raises(DataError, match=r"m\.csv:2: audio path .* leads outside the data root"):
        _load(root, [f"x,happy,s0,{path}", *rows], with_root=True)
    bundle = _load(root, [f"x,happy,s0,{path}", *rows], with_root=True, skip=True)
    assert "x" not in {s.id for split in bundle.splits.values() for s in split}
    # without a root the manifest's folder is only where relative paths start
    bundle = _load(root, [f"x,happy,s0,{path}", *rows], with_root=False)
    assert "x" in {s.id for split in bundle.splits.values() for s in split}
