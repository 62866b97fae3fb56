"""The one error tree: statuses, exit codes and chaining."""

from __future__ import annotations

import pytest

from serving import errors

EXPECTED = {
    # error: (parent, HTTP status, CLI exit code)
    "ServingError": (Exception, 500, 1),
    "InvalidRequest": ("ServingError", 400, 2),
    "InvalidReference": ("InvalidRequest", 400, 2),
    "InvalidManifest": ("InvalidRequest", 400, 2),
    "UnknownFormat": ("InvalidRequest", 400, 2),
    "InvalidInput": ("InvalidRequest", 400, 2),
    "PayloadTooLarge": ("InvalidRequest", 413, 2),
    "MethodNotAllowed": ("InvalidRequest", 405, 2),
    "RequestTimeout": ("InvalidRequest", 408, 2),
    "Unauthorized": ("InvalidRequest", 401, 2),
    "Forbidden": ("InvalidRequest", 403, 2),
    "NotFound": ("ServingError", 404, 3),
    "ModelNotFound": ("NotFound", 404, 3),
    "VersionNotFound": ("NotFound", 404, 3),
    "AliasNotFound": ("NotFound", 404, 3),
    "VersionExists": ("ServingError", 409, 4),
    "IntegrityError": ("ServingError", 422, 5),
    "UntrustedArtifact": ("ServingError", 403, 6),
    "MissingExtra": ("ServingError", 501, 7),
    "LoadError": ("ServingError", 500, 8),
    "IsolationFailed": ("LoadError", 500, 8),
    "StoreError": ("ServingError", 502, 9),
    "StoreUnavailable": ("StoreError", 503, 9),
    "StoreAccessDenied": ("StoreError", 502, 9),
    "StoreNotFound": ("StoreError", 502, 9),
    "StoreConflict": ("StoreError", 409, 9),
    "NotReady": ("ServingError", 503, 10),
    "Overloaded": ("NotReady", 503, 10),
    "WorkerFailed": ("NotReady", 503, 10),
    "DeadlineExceeded": ("ServingError", 504, 13),
    "CacheError": ("ServingError", 500, 11),
    "RolloutAborted": ("ServingError", 409, 12),
    "AliasChanged": ("ServingError", 409, 14),
    "InternalError": ("ServingError", 500, 1),
}


def test_all_lists_exactly_the_error_tree() -> None:
    assert sorted(errors.__all__) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_error_has_its_parent_status_and_exit_code(name: str) -> None:
    parent, status, exit_code = EXPECTED[name]
    cls = getattr(errors, name)
    base = parent if isinstance(parent, type) else getattr(errors, parent)
    assert cls.__bases__ == (base,)
    assert (cls.status_code, cls.exit_code) == (status, exit_code)


def test_every_error_is_drawn_in_the_module_docstring() -> None:
    doc = errors.__doc__ or ""
    for name in EXPECTED:
        assert name in doc


def test_message_is_the_string_form() -> None:
    err = errors.VersionNotFound("version '7' of model 'iris' not found")
    assert str(err) == err.message == "version '7' of model 'iris' not found"


def _translate(cause: Exception) -> None:
    try:
        raise cause
    except ConnectionRefusedError as exc:
        raise errors.StoreUnavailable("store unreachable") from exc


def test_translated_errors_keep_their_cause() -> None:
    cause = ConnectionRefusedError("refused")
    with pytest.raises(errors.StoreUnavailable) as info:
        _translate(cause)
    assert info.value.__cause__ is cause
    assert isinstance(info.value, errors.StoreError)


def test_every_error_crosses_a_process_pickled_with_its_status_and_fields() -> None:
    """A Ray handle call (a member's forward to its owner, two-hop) pickles the error it raises."""
    import pickle

    import serving.errors as errors_module

    def subclasses(cls: type) -> list[type]:
        return [cls, *(s for sub in cls.__subclasses__() for s in subclasses(sub))]

    for cls in subclasses(errors_module.ServingError):
        error = cls.__new__(cls)
        Exception.__init__(error, "boom")
        error.message = "boom"
        error.__dict__.update({"reason": "crash", "retry_after_s": 3})
        back = pickle.loads(pickle.dumps(error))
        assert type(back) is cls
        assert (str(back), back.status_code, back.__dict__) == ("boom", cls.status_code, error.__dict__)
    crashed = pickle.loads(pickle.dumps(errors_module.WorkerFailed("worker died", "crash")))
    assert (crashed.reason, crashed.retry_after_s, crashed.status_code) == ("crash", 1, 503)
