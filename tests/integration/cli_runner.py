"""The ``serving`` command run in the test's process, as a user runs it: its exit code and output."""

from __future__ import annotations

import pytest

from serving import cli


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``serving ARGV...``: the exit code, stdout and stderr (argparse's usage errors included)."""
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:  # NOTE: argparse's usage errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err
