"""Pure data: model references, safe paths, manifests and aliases."""

from __future__ import annotations

import json

import pytest

from serving import errors
from serving.manifest import Alias, FileEntry, Manifest, ModelRef, check_name, check_relative_path

SHA = "0" * 64


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("iris@production", ModelRef("iris", alias="production")),
        ("iris:7", ModelRef("iris", version="7")),
        ("iris", ModelRef("iris", alias="production")),
        ("my-model_v2.1@canary", ModelRef("my-model_v2.1", alias="canary")),
        ("iris:candidate-3", ModelRef("iris", version="candidate-3")),
    ],
)
def test_valid_references_parse(text: str, expected: ModelRef) -> None:
    assert ModelRef.parse(text) == expected
    assert str(ModelRef.parse(text)) == (text if ("@" in text or ":" in text) else f"{text}@production")


def test_a_bare_name_uses_the_default_alias() -> None:
    assert ModelRef.parse("iris", default_alias="staging") == ModelRef("iris", alias="staging")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "iris@",
        "@production",
        "iris:",
        ":7",
        "iris:v:1",
        "iris@prod@x",
        "iris@prod:1",
        "../iris",
        "iris/x@prod",
        "iris@../prod",
        "iris:..",
        ".",
        "..",
        "-iris",
        "iris name",
        "a" * 129,
    ],
)
def test_malformed_references_are_invalid(text: str) -> None:
    with pytest.raises(errors.InvalidReference):
        ModelRef.parse(text)


def test_invalid_reference_is_a_client_error() -> None:
    with pytest.raises(errors.InvalidRequest) as info:
        ModelRef.parse("iris:v:1")
    assert info.value.status_code == 400


@pytest.mark.parametrize("name", ["a", "A1", "x" * 128, "v1.2_rc-3"])
def test_plain_names_are_accepted(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["2\n", "iris\n", " 2", "2 ", "2\t", "\x002", "2\r", "ir\u200bis", "２"])
def test_names_with_control_characters_whitespace_or_non_ascii_are_refused(name: str) -> None:
    """'2\n' passed a ``$``-anchored match (``$`` matches before a final newline)."""
    with pytest.raises(errors.InvalidReference, match="invalid version"):
        check_name(name, "version")
    with pytest.raises(errors.InvalidReference):
        ModelRef.parse(f"iris:{name}")


@pytest.mark.parametrize("path", ["model.bin", "weights/layer1.npy", "a/b/c.json", ".hidden"])
def test_plain_relative_paths_are_accepted(path: str) -> None:
    assert check_relative_path(path) == path


@pytest.mark.parametrize(
    "path",
    [
        "",
        "/etc/passwd",
        "../secret",
        "a/../../b",
        "a/./b",
        "./a",
        "a//b",
        "a/",
        "a\\b",
        "a\x00b",
        "manifest.json",
    ],
)
def test_unsafe_paths_are_invalid_manifests(path: str) -> None:
    with pytest.raises(errors.InvalidManifest):
        check_relative_path(path)


def _manifest_json(paths: list[str]) -> bytes:
    files = ",".join(f'{{"path": "{p}", "size": 1, "sha256": "{SHA}"}}' for p in paths)
    return f'{{"name": "iris", "version": "1", "format": "raw", "files": [{files}]}}'.encode()


@pytest.mark.parametrize(
    "paths",
    [["../x.bin"], ["/abs/x.bin"], ["a.bin", "a.bin"], ["ok.bin", "dir/../../escape"]],
    ids=["dotdot", "absolute", "duplicate", "nested-dotdot"],
)
def test_manifest_with_unsafe_or_duplicate_paths_is_invalid(paths: list[str]) -> None:
    with pytest.raises(errors.InvalidManifest) as info:
        Manifest.from_json(_manifest_json(paths))
    assert paths[-1] in str(info.value)  # names the offending path


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"[1, 2]",
        b'{"name": "iris"}',
        b'{"name": "iris", "version": "1", "format": "raw", "files": [{"path": "a", "size": -1, "sha256": "'
        + SHA.encode()
        + b'"}]}',
        b'{"name": "iris", "version": "1", "format": "raw", "files": '
        b'[{"path": "a", "size": 1, "sha256": "XYZ"}]}',
    ],
    ids=["empty", "not-an-object", "missing-fields", "negative-size", "bad-digest"],
)
def test_unparseable_manifest_is_invalid(raw: bytes) -> None:
    with pytest.raises(errors.InvalidManifest):
        Manifest.from_json(raw)


def test_manifest_round_trips_through_json() -> None:
    m = Manifest(
        name="iris",
        version="3",
        format="sklearn",
        files=[
            FileEntry(path="model.joblib", size=10, sha256=SHA),
            FileEntry(path="x/y", size=5, sha256=SHA),
        ],
        options={"k": 1},
    )
    again = Manifest.from_json(m.to_json())
    assert again == m
    assert again.total_bytes == 15


def test_moving_an_alias_keeps_the_previous_target_in_history() -> None:
    a = Alias(name="iris", alias="production", version="1", manifest_sha256=SHA, updated_by="alice")
    b = a.moved_to("2", "1" * 64, by="bob")
    assert (b.version, b.updated_by) == ("2", "bob")
    assert [(h.version, h.updated_by) for h in b.history] == [("1", "alice")]
    assert a.history == []  # the original is unchanged


def test_alias_history_is_bounded() -> None:
    a = Alias(name="iris", alias="production", version="0", manifest_sha256=SHA)
    for v in range(1, 150):
        a = a.moved_to(str(v), SHA, by="ci")
    assert len(a.history) == 100
    assert a.history[-1].version == "148"


def test_unparseable_alias_is_invalid() -> None:
    with pytest.raises(errors.InvalidManifest):
        Alias.from_json(b'{"name": "iris"}')


def test_an_over_long_manifest_path_is_refused_with_a_clear_error() -> None:
    """A 300-character name would be an OSError in the cache; it is an InvalidManifest up front."""
    with pytest.raises(errors.InvalidManifest, match="too long"):
        FileEntry(path="a" * 300, size=1, sha256="0" * 64)


def test_a_path_that_is_both_a_file_and_a_folder_is_refused() -> None:
    entries = [
        {"path": "weights", "size": 1, "sha256": "0" * 64},
        {"path": "weights/part-0", "size": 1, "sha256": "1" * 64},
    ]
    with pytest.raises(errors.InvalidManifest, match="as a file and as a folder"):
        Manifest.from_json(
            json.dumps({"name": "m", "version": "1", "format": "raw", "files": entries}).encode()
        )


def test_an_alias_with_events_this_reader_cannot_use_is_still_read() -> None:
    """Events are a record: an unknown kind, an overlong detail or too many of them are dropped,
    never a reason to refuse the alias (every replica would stop following it)."""
    import json

    from serving.manifest import MAX_ALIAS_EVENTS, Alias

    good = {"sequence": 3, "at": "2026-12-05T00:00:00Z", "by": "ci", "event": "canary", "version": "2"}
    body = {
        "name": "m",
        "alias": "production",
        "version": "1",
        "manifest_sha256": "a" * 64,
        "sequence": 9,
        "events": [
            {**good, "event": "rebalanced"},
            {**good, "detail": "x" * 100_000},
            {**good, "by": "y" * 10_000},
            "not an object",
            *([good] * (MAX_ALIAS_EVENTS + 10)),
        ],
    }
    alias = Alias.from_json(json.dumps(body).encode())
    assert alias.version == "1"
    assert alias.events is not None
    assert len(alias.events) == MAX_ALIAS_EVENTS
    assert {e.event for e in alias.events} == {"canary"}
    assert Alias.from_json(json.dumps({**body, "events": "nonsense"}).encode()).events is None
