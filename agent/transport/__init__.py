"""Bundle transports: HTTP with Range resume, MQTT block transfer with a resume bitmap.

The install state machine calls a `Fetcher`:

    fetcher = SourcesFetcher(http=HttpFetcher(), blocks=MqttBlockFetcher(link))
    path = fetcher.fetch(directive, layout.downloads / directive.bundle.sha256)

Invariants of every fetcher:

- `destination` appears (atomic rename) only when the file's length and SHA-256
  are the signed directive's; nothing is ever written beyond that length;
- until then bytes live beside it in `<destination>.part` and, for block
  transfer, `<destination>.blocks` (a part without a bitmap is a prefix, as the
  HTTP transport writes; with one it is addressed by block). Either transport
  resumes what the other left;
- a transient failure raises DownloadError and keeps what arrived; a digest
  mismatch raises TamperedFileError and a length the directive does not allow
  FileLengthError, both discarding the part (a resumed transfer that ends in a
  digest mismatch starts over from zero once before refusing);
- calling `fetch` again after a crash at any point is safe: an already
  complete destination is returned as it is.

Modules: `base` (the interface, the final check), `http`, `blocks` (the MQTT
block fetcher) with `bitmap` (its part file and resume bitmap), `sources`
(trying a directive's sources in order). The MQTT connection itself is
`edgefleet.agent.link.AgentLink`, on the core's `edgefleet.mqtt.session`.
"""

from edgefleet.agent.transport.base import Fetcher, FetchStats, SourceFetcher
from edgefleet.agent.transport.blocks import BlockChannel, BlocksHandler, MqttBlockFetcher
from edgefleet.agent.transport.http import HttpFetcher
from edgefleet.agent.transport.sources import SourcesFetcher

__all__ = [
    "BlockChannel",
    "BlocksHandler",
    "FetchStats",
    "Fetcher",
    "HttpFetcher",
    "MqttBlockFetcher",
    "SourceFetcher",
    "SourcesFetcher",
]
