"""Write the CLI reference (docs/cli.md) from the typer app itself, so it cannot drift from the commands.

    .venv/bin/python scripts/docs_cli.py            # rewrite docs/cli.md
    .venv/bin/python scripts/docs_cli.py --check    # exit 1 when the committed page is stale

The page is typer's own Markdown (`typer emofuse.cli.app utils docs`) under a short preface.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import typer.main
from typer.cli import get_docs_for_click

try:  # typer 0.2x carries its own copy of click, whose Context its commands expect
    from typer import _click as click
except ImportError:  # pragma: no cover
    import click

PAGE = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
PREFACE = """\
Generated from the typer app by `scripts/docs_cli.py`; `emofuse COMMAND --help` says the same. Options
that take component settings (`--set key.path=value`) are described in [Concepts](concepts.md) and on the
[corpus reader pages](datasets/ravdess.md).
"""


def cli_markdown() -> str:
    """The reference page: every command, argument and option of the `emofuse` app."""
    from emofuse.cli.app import app

    command = typer.main.get_command(app)
    docs = get_docs_for_click(obj=command, ctx=click.Context(command, info_name="emofuse"), name="emofuse",
                              title="CLI reference")
    title, _, body = docs.partition("\n\n")
    return f"{title}\n\n{PREFACE}\n{body.rstrip()}\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only report whether docs/cli.md is up to date")
    args = p.parse_args(argv)
    text = cli_markdown()
    current = PAGE.read_text(encoding="utf-8") if PAGE.is_file() else ""
    if args.check:
        print("docs/cli.md is up to date" if text == current else "docs/cli.md is stale: run scripts/docs_cli.py")
        return 0 if text == current else 1
    PAGE.write_text(text, encoding="utf-8")
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
