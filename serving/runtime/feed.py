"""Following the aliases of many models with one list request per interval.

A replica that holds hundreds of model-set members cannot afford one alias read per
member per poll interval. Every alias move also rewrites a small marker object,
``_feed/<alias>/<model>`` (:meth:`serving.repository.Repository.alias_feed`), so one
listing of ``_feed/<alias>/`` (a request per 1,000 models) shows every marker's ETag.
:class:`AliasFeed` compares them with the last listing and nudges the watcher of each
loaded member whose marker changed: that watcher then reads its alias at once, with
the usual checks. The members' own watchers poll only every ``full_check_interval_s``,
the safety net for a move whose marker was not written (a writer that crashed between
the two writes, or an older writer).

Plain Python: the store, the members and the nudge are passed in, so tests call
:meth:`AliasFeed.tick` directly; the server runs :func:`run_feed` in one thread.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Mapping

from serving.errors import ServingError
from serving.repository import Repository

log = logging.getLogger(__name__)


class AliasFeed:
    """Nudges the loaded members whose alias markers changed since the last listing.

    Args:
        repo: the store the members come from.
        members: the loaded members now, name -> the alias each follows.
        nudge: make a member's watcher check its alias now.
    """

    def __init__(
        self,
        repo: Repository,
        members: Callable[[], Mapping[str, str]],
        nudge: Callable[[str], None],
        after: Callable[[], object] | None = None,
    ) -> None:
        """``after``: run at the end of every tick (the pool trims itself to its budget)."""
        self._repo = repo
        self._members = members
        self._nudge = nudge
        self._after = after
        self._seen: dict[str, dict[str, str]] = {}
        """Per alias, per model: the marker's ETag at the last listing."""
        self._known: set[str] = set()
        """The members loaded at the last tick."""

    def tick(self) -> list[str]:
        """List the feed of every alias a loaded member follows; returns the members nudged.

        A member loaded since the last tick is nudged once too: its alias may have moved
        between its load and this listing, which then already shows the new marker."""
        loaded = dict(self._members())
        nudged: list[str] = []
        listed: set[str] = set()
        for alias in sorted(set(loaded.values())):
            try:
                markers = self._repo.alias_feed(alias)
            except ServingError as exc:
                log.warning("could not list the alias feed of %r: %s", alias, exc)
                continue
            listed.add(alias)
            seen = self._seen.get(alias, {})
            self._seen[alias] = markers
            for name, follows in loaded.items():
                if follows == alias and (name not in self._known or markers.get(name) != seen.get(name)):
                    nudged.append(name)
        # NOTE: a member whose alias could not be listed stays new, so it is nudged next time.
        self._known = {name for name, alias in loaded.items() if alias in listed}
        for name in nudged:
            try:
                self._nudge(name)
            except Exception:  # NOTE: one member unloaded meanwhile must not stop the rest
                log.exception("nudging %s failed", name)
        if self._after is not None:
            self._after()
        return nudged


def run_feed(feed: AliasFeed, interval_s: float, jitter: float, stop: threading.Event) -> None:
    """Tick ``feed`` every ``interval_s`` (± ``jitter``) until ``stop`` is set."""
    rng = random.Random()  # noqa: S311 -- NOTE: jitter, not cryptography
    while True:
        try:
            feed.tick()
        except Exception:
            log.exception("alias feed tick failed")
        if stop.wait(interval_s * (1 + rng.uniform(-jitter, jitter))):
            return
