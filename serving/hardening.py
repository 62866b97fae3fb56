"""Process hardening and minimum framework versions for loading untrusted-looking bytes.

:func:`serving.trust.check_trust` calls both before every load, so any process
that loads a model (a Ray replica, ``serving.load``, the CLI) is covered.
"""

from __future__ import annotations

import os
import re

from serving.errors import LoadError
from serving.formats.table import FORMAT_FACTS, MIN_VERSIONS

__all__ = ["MIN_VERSIONS", "check_framework_versions", "harden_process"]


def _parse(v: str) -> tuple[int, ...]:
    parts = []
    for piece in v.split(".")[:3]:
        m = re.match(r"\d+", piece)
        if not m:
            break
        parts.append(int(m.group()))
    return tuple(parts)


def check_framework_versions(format_name: str) -> None:
    """Refuse to load ``format_name`` with an installed framework older than the minimum.

    A framework that is not installed is left to the loader (it raises MissingExtra).

    Raises:
        LoadError: an installed framework is older than :data:`MIN_VERSIONS`.
    """
    from serving.formats.base import installed_version

    facts = FORMAT_FACTS.get(format_name)
    for package in facts.checked_packages if facts is not None else ():
        installed = installed_version(package)
        if installed is None:
            continue
        minimum, why = MIN_VERSIONS[package]
        if _parse(installed) < _parse(minimum):
            raise LoadError(
                f"refusing to load {format_name}: {package} {installed} is older than {minimum} "
                f"({why}); upgrade {package}"
            )


def harden_process() -> None:
    """Make every ``torch.load`` in this process ``weights_only``, whatever its call site says.

    torch reads these variables at each ``torch.load`` call, so setting them late still works.
    """
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    # NOTE: torch raises if both are set; the opt-out must not survive.
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
