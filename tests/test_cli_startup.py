"""The CLI answers help and listings without importing torch (the issue measured 3.5 s and 648 MiB for
`emofuse --help`): heavy modules are imported inside the commands, and `emofuse plugins` is served
from a listing kept beside a stamp of the code it was read from."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

#: Runs the CLI in this process, then reports whether torch got imported and what the CLI printed.
RUNNER = """
import contextlib, io, json, sys
from emofuse.cli.app import main
sys.argv = ["emofuse", *sys.argv[1:]]
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        main()
    except SystemExit as exc:
        code = exc.code
    else:
        code = 0
print(json.dumps({"torch": "torch" in sys.modules, "code": code, "stdout": out.getvalue()}))
"""


def _cli(*args: str, cache: Path, **env: str) -> dict:
    environ = {k: v for k, v in os.environ.items() if k != "EMOFUSE_PLUGINS"}
    environ.update(EMOFUSE_CACHE_DIR=str(cache), COLUMNS="200", **env)
    done = subprocess.run([sys.executable, "-c", RUNNER, *args], capture_output=True, text=True, env=environ,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["presets"], ["--threads", "1", "presets"],
                                  ["cache", "--cache-dir", "{tmp}/runs/.cache"]])
def test_help_presets_and_the_cache_listing_do_not_import_torch(args, tmp_path):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = _cli(*args, cache=tmp_path)
    assert result["code"] == 0 and result["stdout"].strip()
    assert not result["torch"], f"emofuse {' '.join(args)} imported torch"


def test_plugins_is_listed_from_the_cache_until_the_code_it_was_read_from_changes(tmp_path):
    first = _cli("plugins", "--json", cache=tmp_path)
    assert first["torch"]  # the first listing reads the classes
    listed = json.loads(first["stdout"])
    again = _cli("plugins", "--json", cache=tmp_path)
    assert not again["torch"] and json.loads(again["stdout"]) == listed

    # An edited plugin module (its stamp no longer matches) is read again.
    stored_path = tmp_path / "plugins" / "listing.json"
    stored = json.loads(stored_path.read_text())
    focal = next(f for f in stored["files"] if f.endswith(os.path.join("losses", "focal.py")))
    stored["files"][focal][0] += 1
    stored_path.write_text(json.dumps(stored))
    assert _cli("plugins", "--json", cache=tmp_path)["torch"]
    assert not _cli("plugins", "--json", cache=tmp_path)["torch"]

    # So is a listing under another plugin selection, and it lists only what was selected.
    narrowed = _cli("plugins", "--json", cache=tmp_path, EMOFUSE_PLUGINS="focal")
    assert narrowed["torch"]
    assert {c["name"] for c in json.loads(narrowed["stdout"])["components"]} == {"focal"}
