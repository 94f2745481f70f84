"""The documentation cannot drift from the code: the site builds with `mkdocs build --strict` (a broken link
or a docstring reference that no longer resolves fails it), the CLI page and every results table are what
their scripts generate, every `emofuse ...` line in the docs names a real command with real options, every
Python example runs, each corpus reader's page names all its options, and the README stays short, opens
with the two commands and points only at files of the checkout."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main

try:  # typer 0.2x carries its own copy of click; its commands raise that copy's exceptions
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover
    from click import exceptions as click_errors

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "scripts"))

import docs_cli  # noqa: E402
import results_tables  # noqa: E402

from emofuse.cli.app import app  # noqa: E402

README = REPO / "README.md"
#: Pages written by hand (docs/cli.md is generated and held equal to its script's output below).
PAGES = sorted(p for p in (REPO / "docs").rglob("*.md") if p.name != "cli.md")
TWO_COMMANDS = ["bash scripts/setup.sh && .venv/bin/emofuse compare", "HF_HUB_OFFLINE=1 .venv/bin/python -m pytest"]


def blocks(markdown: Path, *languages: str) -> list[str]:
    pattern = r"```(?:" + "|".join(languages) + r")\n(.*?)```"
    return re.findall(pattern, markdown.read_text(encoding="utf-8"), flags=re.S)


# -- the site --------------------------------------------------------------------------------------------
def test_the_site_builds_strictly(tmp_path):
    """`mkdocs build --strict`: every page in the nav, every link and anchor, every `::: module` reference."""
    try:
        import mkdocstrings  # noqa: F401
        import material  # noqa: F401
    except ImportError:
        pytest.fail("the docs extra is missing: run `bash scripts/setup.sh` (installs '.[docs]')")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                            cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    reference = (tmp_path / "site" / "reference" / "core" / "index.html").read_text(encoding="utf-8")
    assert 'id="emofuse.core.interfaces.Encoder"' in reference, "the API reference lost its docstrings"


def test_the_cli_page_is_what_the_typer_app_generates():
    assert (REPO / "docs" / "cli.md").read_text(encoding="utf-8") == docs_cli.cli_markdown(), \
        "docs/cli.md is stale: run `.venv/bin/python scripts/docs_cli.py`"


def test_every_results_table_is_what_the_json_files_generate():
    for relative in results_tables.TARGETS:
        text = (REPO / relative).read_text(encoding="utf-8")
        assert results_tables.REGION.search(text), f"{relative} has no generated results region"
        assert results_tables.render(text) == text, \
            f"{relative}: results tables are stale: run `.venv/bin/python benchmarks/results_tables.py`"
    results = (REPO / "docs" / "results.md").read_text(encoding="utf-8")
    for section in results_tables.SECTIONS:
        assert f"## {section.title}\n" in results
        assert all((results_tables.RESULTS / name).is_file() for name in section.files), section.name


def test_a_results_region_is_rewritten_from_its_json_and_an_unknown_one_is_named(tmp_path):
    stale = "<!-- results:emodb first -->\n| typed by hand |\n<!-- /results -->\n"
    fresh = results_tables.render(stale)
    assert "typed by hand" not in fresh and "| audio_text alone (mm-lstm) | 88.3 ± 5.8 |" in fresh
    with pytest.raises(SystemExit, match="no such section"):
        results_tables.render("<!-- results:nothing -->\n<!-- /results -->")


def test_a_new_result_file_of_flat_rows_gets_a_table_and_an_unknown_shape_is_refused(tmp_path, monkeypatch):
    """How the lead adds a measurement: a JSON file and a Section; flat rows (timings) need no formatter."""
    (tmp_path / "timings.json").write_text('{"rows": [{"stage": "branches", "seconds": 312.46}, '
                                           '{"stage": "fusions", "seconds": 9.0}]}')
    (tmp_path / "odd.json").write_text('{"seconds": 3}')
    monkeypatch.setattr(results_tables, "RESULTS", tmp_path)
    (table,) = results_tables.section_tables(results_tables.Section("timings", ("timings.json",), "T", "D."))
    assert table.splitlines()[0] == "| stage | seconds |" and "| branches | 312.5 |" in table
    with pytest.raises(SystemExit, match="section 'odd'.*add a formatter"):
        results_tables.section_tables(results_tables.Section("odd", ("odd.json",), "Odd", "D."))


# -- code examples ---------------------------------------------------------------------------------------
def emofuse_calls(markdown: Path) -> list[list[str]]:
    """The arguments of every `emofuse` (or `.venv/bin/emofuse`) command in the page's shell blocks."""
    calls = []
    for block in blocks(markdown, "bash", "sh", "console"):
        for line in block.replace("\\\n", " ").splitlines():
            words: list[str] = []
            redirected = False  # `> file` and what follows it are the shell's, not the command's
            for word in shlex.split(line, comments=True) + [";"]:
                if word not in ("&&", "||", ";", "|"):
                    redirected = redirected or word in (">", ">>", "<", "2>", "2>&1")
                    if not redirected:
                        words.append(word)
                    continue
                redirected = False
                while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):  # VAR=value before a command
                    words.pop(0)
                if words and Path(words[0]).name == "emofuse":
                    calls.append(words[1:])
                words = []
    return calls


def parse_without_running(args: list[str]) -> None:
    """Resolve `emofuse ARGS` to its (sub)command and parse every option and argument as click would, running
    nothing. A path that does not exist on this machine is an example's file and passes."""
    command = typer.main.get_command(app)
    name, parent = "emofuse", None
    while True:
        try:
            ctx = command.make_context(name, list(args), parent=parent)
        except click_errors.BadParameter as exc:
            if "does not exist" in exc.format_message():
                return
            raise
        except typer.Exit:  # --help: an eager option that answers and stops
            return
        if not hasattr(command, "resolve_command"):  # a command, not a group of them
            return
        rest = [*getattr(ctx, "_protected_args", []), *ctx.args]
        if not rest:
            return
        name, command, args = command.resolve_command(ctx, rest)
        parent = ctx


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: str(p.relative_to(REPO)))
def test_every_emofuse_command_in_the_docs_exists_with_its_options(page):
    for args in emofuse_calls(page):
        try:
            parse_without_running(args)
        except click_errors.ClickException as exc:
            pytest.fail(f"{page.relative_to(REPO)}: `emofuse {shlex.join(args)}`: {exc.format_message()}")


def test_the_command_check_catches_a_wrong_option_and_a_wrong_command():
    with pytest.raises(click_errors.NoSuchOption):
        parse_without_running(["train", "--preset", "mm-lstm", "--epochz", "3"])
    with pytest.raises(click_errors.UsageError):
        parse_without_running(["trian", "--preset", "mm-lstm"])
    with pytest.raises(click_errors.UsageError):
        parse_without_running(["cache", "prune", "--older-than", "3", "--bogus"])
    parse_without_running(["cache", "prune", "--older-than", "3", "--dry-run"])


def test_the_docs_have_shell_examples_to_check():
    assert sum(len(emofuse_calls(page)) for page in [README, *PAGES]) >= 40


@pytest.mark.parametrize("page", [p for p in [README, *PAGES] if blocks(p, "python")],
                         ids=lambda p: str(p.relative_to(REPO)))
def test_every_python_example_runs(page):
    """The Python API page's example trains on real data, so tests/test_python_api.py runs it; the others
    run here as written."""
    if page == REPO / "docs" / "python-api.md":
        runner = (REPO / "tests" / "test_python_api.py").read_text(encoding="utf-8")
        assert '_python_blocks(REPO / "docs" / "python-api.md")' in runner and "exec(compile(example" in runner
        return
    for block in blocks(page, "python"):
        exec(compile(block, str(page.relative_to(REPO)), "exec"), {"__name__": "__docs_example__"})


# -- corpus reader pages ---------------------------------------------------------------------------------
@pytest.mark.parametrize("reader, page", [("ravdess", "ravdess"), ("crema-d", "crema-d"), ("emodb", "emodb"),
                                          ("meld", "meld"), ("manifest", "manifest"),
                                          ("feature-table", "feature-table")])
def test_each_corpus_reader_page_names_every_option_of_its_reader(reader, page):
    from emofuse.core.registry import get_registry

    text = (REPO / "docs" / "datasets" / f"{page}.md").read_text(encoding="utf-8")
    reader_class = get_registry().get("dataset", reader).cls
    assert f"(`{reader}`)" in text.splitlines()[0]
    missing = [option for option in reader_class.Config.model_fields if f"`{option}`" not in text]
    assert not missing, f"docs/datasets/{page}.md does not describe {missing}"


# -- the README ------------------------------------------------------------------------------------------
def test_the_readme_is_short_and_opens_with_the_two_commands():
    text = README.read_text(encoding="utf-8")
    assert len(text.encode()) < 10_000
    first_block = blocks(README, "bash")[0]
    assert [line for line in first_block.splitlines() if line and not line.startswith("#")] == TWO_COMMANDS
    assert text.index("```bash") < text.index("\n## ")


def test_the_readme_points_only_at_files_of_the_checkout():
    text = README.read_text(encoding="utf-8")
    assert "../shared" not in text and "DESIGN.md" not in text
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if not re.match(r"^[a-z]+://", target):
            assert (REPO / target).exists(), f"README links {target}, which is not in the checkout"


def test_every_documented_training_composes_a_valid_config(tmp_path, monkeypatch):
    """Each `emofuse train ...` in the docs, run with `--dry-run`: its preset exists, its `--set`s and component
    options are valid (the config is printed, nothing trains). The plugin guide's encoder comes from the plugin
    it has the reader write first, so its line is left to the plugin's own tests."""
    from typer.testing import CliRunner

    runner = CliRunner()
    monkeypatch.chdir(tmp_path)  # the guide's run.toml is `emofuse presets mm-lstm > run.toml`
    (tmp_path / "run.toml").write_text(runner.invoke(app, ["presets", "mm-lstm"]).stdout)
    trainings = [args for page in [README, *PAGES] for args in emofuse_calls(page) if args[:1] == ["train"] and "audio=prosody-audio" not in args]
    assert len(trainings) >= 10
    for args in trainings:
        result = runner.invoke(app, [*args, "--dry-run"])
        assert result.exit_code == 0, f"`emofuse {shlex.join(args)} --dry-run`: {result.output}"
