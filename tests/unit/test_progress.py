"""Progress bars appear only for a person watching a terminal, and only for big transfers."""

from __future__ import annotations

import io

from serving.progress import progress_factory


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_no_bars_when_stderr_is_not_a_terminal() -> None:
    assert progress_factory(True, io.StringIO()) is None


def test_no_bars_when_settings_turn_them_off() -> None:
    assert progress_factory(False, _Terminal()) is None


def test_small_transfers_get_no_bar() -> None:
    make = progress_factory(True, _Terminal(), min_bytes=1000)
    assert make is not None
    assert make("iris:1/model.joblib", 999) is None


def test_a_big_transfer_draws_a_bar_removed_once_complete() -> None:
    """The bar shows the label and total, takes byte increments (as boto3 gives them)
    and is cleared from the terminal when the last byte arrives."""
    term = _Terminal()
    make = progress_factory(True, term, min_bytes=1000)
    assert make is not None
    callback = make("iris:1/model.joblib", 4096)
    assert callback is not None
    for _ in range(4):
        callback(1024)
    assert "iris:1/model.joblib" in term.getvalue()
    out = term.getvalue()
    assert "4.00k" in out
    assert out.endswith(" \r")  # tqdm(leave=False) erases the line on close
