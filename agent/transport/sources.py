"""Trying a directive's sources in the order the server listed them."""

from __future__ import annotations

from pathlib import Path

from edgefleet.agent.errors import CompatibilityError, DownloadError
from edgefleet.agent.transport.base import SourceFetcher, install_bundle
from edgefleet.errors import BundleError
from edgefleet.mqtt.directives import Directive


class SourcesFetcher:
    """A `Fetcher` over every transport this agent has, e.g. `SourcesFetcher(http=..., blocks=...)`.

    Sources are tried in the directive's order; those whose transport the agent
    lacks are skipped. The first that delivers wins. When none does, the error
    is transient (DownloadError) if any source failed transiently, since a
    later attempt may get through; otherwise the first refusal is raised
    (TamperedFileError, FileLengthError), which the install reports as such.
    """

    checks_digest = True  # the installer's marker: every transport here checks the digest

    def __init__(
        self, *, http: SourceFetcher | None = None, blocks: SourceFetcher | None = None
    ) -> None:
        self._by_transport: dict[str, SourceFetcher] = {}
        if http is not None:
            self._by_transport["http"] = http
        if blocks is not None:
            self._by_transport["mqtt-blocks"] = blocks

    def fetch(self, directive: Directive, destination: Path) -> Path:
        """See `Fetcher.fetch`.

        Raises:
            DownloadError: every usable source failed, at least one of them transiently.
            TamperedFileError, FileLengthError: every usable source was refused.
            CompatibilityError: no source uses a transport this fetcher has (fatal).
            UsageError: not an install directive.
        """
        bundle = install_bundle(directive)
        transient: list[DownloadError] = []
        refused: list[BundleError] = []
        for source in directive.sources:
            fetcher = self._by_transport.get(source.transport)
            if fetcher is None:
                continue
            try:
                return fetcher.fetch_from(source, bundle, destination)
            except DownloadError as exc:
                transient.append(exc)
            except BundleError as exc:
                refused.append(exc)
        if transient:
            reasons = "; ".join(str(exc) for exc in [*transient, *refused])
            raise DownloadError(reasons) from transient[-1]
        if refused:
            raise refused[0]
        listed = ", ".join(source.transport for source in directive.sources) or "none"
        raise CompatibilityError(
            f"no transport for the directive's sources ({listed}); this agent has "
            f"{', '.join(sorted(self._by_transport)) or 'none'}"
        )
