"""The distribution installs under the one import name `emofuse`, from an editable install and a wheel."""
from __future__ import annotations

import importlib.metadata as md
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import emofuse

REPO = Path(__file__).resolve().parents[1]


def test_editable_install_imports_from_the_checkout():
    import emofuse.cli.app
    import emofuse.core.registry
    import emofuse.plugins

    assert Path(emofuse.__file__).resolve().parent == REPO
    assert Path(emofuse.core.registry.__file__).resolve() == REPO / "core" / "registry.py"


def test_no_bare_top_level_packages_in_site_packages():
    site = Path(sysconfig.get_paths()["purelib"])
    for bare in ("core", "cli", "plugins"):
        assert not (site / bare).exists(), f"a bare {bare!r} package landed in {site}"
    # (other distributions may ship a bare `tests`; ours must not)
    # (look in site-packages only: an emofuse.egg-info that a build leaves in the checkout describes sources)
    (dist,) = [d for d in md.distributions(path=[str(site)]) if d.metadata["Name"] == "emofuse"]
    ours = [str(f) for f in dist.files or []]
    assert not [f for f in ours if f.split("/")[0] in ("core", "cli", "plugins", "tests")], ours


def test_wheel_holds_only_emofuse_and_imports(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(REPO)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = tmp_path.glob("emofuse-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"emofuse", f"emofuse-{emofuse.__version__}.dist-info"}, top
    assert "emofuse/registry.toml" in names and "emofuse/core/registry.py" in names
    assert "emofuse/core/apps/static/index.html" in names  # the page `emofuse serve` shows
    assert not any(n.startswith("emofuse/tests/") for n in names)
    entry_points = zipfile.ZipFile(wheel).read(f"emofuse-{emofuse.__version__}.dist-info/entry_points.txt").decode()
    assert "[emofuse]" in entry_points and "emofuse.plugins.losses.focal" in entry_points
    # import straight from the wheel, ahead of the editable install
    code = ("import emofuse, emofuse.core.presets as p; print(emofuse.__file__); "
            "print(sorted(p.load_presets())); from emofuse.core.apps.serve import page_html; "
            "print('predict-form' in page_html())")
    out = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(wheel), "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, check=True, cwd=tmp_path, timeout=120).stdout
    assert str(wheel) in out.splitlines()[0]
    assert "enhanced-late-fusion" in out
    assert out.splitlines()[-1] == "True"  # the page is read from the wheel's package data
