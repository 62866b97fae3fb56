"""The admin token fails closed (issue 22): set-but-empty refuses, a trailing newline does not."""

from __future__ import annotations

from pathlib import Path

import pytest

from serving.errors import InvalidRequest
from serving.settings import Settings


@pytest.mark.parametrize("value", ["", "   ", "\n"])
def test_a_token_set_but_empty_is_refused_not_read_as_no_token(value: str) -> None:
    with pytest.raises(InvalidRequest, match="SERVING_ADMIN_TOKEN is set but empty"):
        Settings(admin_token=value).admin_token_value()  # type: ignore[arg-type]


def test_no_token_at_all_is_none() -> None:
    assert Settings().admin_token_value() is None


def test_surrounding_whitespace_and_a_trailing_newline_are_stripped(tmp_path: Path) -> None:
    assert Settings(admin_token=" s3cret\n").admin_token_value() == "s3cret"  # type: ignore[arg-type]
    secret = tmp_path / "token"
    secret.write_text("s3cret\n")  # NOTE: what `kubectl create secret --from-file` mounts
    assert Settings(admin_token_file=secret).admin_token_value() == "s3cret"


def test_an_empty_token_file_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text(" \n")
    with pytest.raises(InvalidRequest, match="is empty"):
        Settings(admin_token_file=secret).admin_token_value()


def test_the_stripped_token_is_the_one_the_data_plane_accepts() -> None:
    from serving.config import AppConfig
    from serving.dataplane import DataPlane

    token = Settings(admin_token="s3cret\n").admin_token_value()  # type: ignore[arg-type]
    plane = DataPlane(AppConfig.model_validate({"models": [{"name": "m"}]}), {}, None, admin_token=token)  # type: ignore[arg-type]
    plane.authorize("Bearer s3cret")
