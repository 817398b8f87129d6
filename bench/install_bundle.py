"""Benchmark: how long the installer takes over a large bundle, before and after reading it once.

A real bundle (the digits MLP, converted for the test profile, so its smoke
test passes) is padded with a random `weights.bin` to --size-mib MiB (256 by
default) and installed through `Installer` on a fresh state directory each
time, with no health probe (it commits with a note: nothing waits):

- install_file: `agent install BUNDLE_FILE`, copied under downloads/ first;
- directive: a signed directive whose bundle `HttpFetcher` downloads from a
  local HTTP server (in this process, over 127.0.0.1).

"before" is the same installer with VERIFYING as it was before the bundle was
read once (`verify_as_before`: the file hashed again, then `verify_bundle`
reading every file, and only then extraction reading it all again); "after"
is the installer as it is (the manifest alone decides, extraction is the one
pass that checks every file). The two alternate, --rounds times each, and the
medians are shown with their ratio. "reads" is what this process read
(`rchar` of /proc/self/io) over the bundle's size: the directive rows count
the HTTP server's read of the file too. The peer is `sha256sum` over the same
file: one read of the bundle, the least any check of it can cost. The file is
read from a warm page cache; extraction writes (and fsyncs) to the disk.

    PYTHONPATH=. python bench/install_bundle.py [--size-mib 256] [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from edgefleet.agent.install import Installer, State
from edgefleet.agent.install.context import InstallContext
from edgefleet.agent.install.handlers import (
    HANDLERS,
    Step,
    bundle_limits,
    bundle_policy,
    verify,
)
from edgefleet.agent.install.record import InstallRecord
from edgefleet.agent.layout import StateLayout
from edgefleet.agent.transport import HttpFetcher
from edgefleet.agentconfig import AgentConfig
from edgefleet.bundle import build_bundle, verify_bundle
from edgefleet.converter import ConvertOptions, convert
from edgefleet.fileio import file_sha256
from edgefleet.keys import SigningKey
from edgefleet.mqtt import BundleRef, Directive, HttpSource, sign_directive
from edgefleet.tables import format_columns
from edgefleet.timefmt import format_time, utcnow
from edgefleet.trust import TrustRoot
from tests.agent.power_loss_driver import MODELS, PROFILE, device_config
from tests.agent.test_transport_http import FileServer
from tests.conftest import KeySet, make_trust_root
from tests.fixtures import datasets

MIB = 1024 * 1024
WRITE_CHUNK = 4 * MIB


def verify_as_before(context: InstallContext, record: InstallRecord) -> Step:
    """VERIFYING before the bundle was read once: hash the file again, verify it whole."""
    path = Path(record.download or "")
    file_sha256(path)
    policy, limits = bundle_policy(context), bundle_limits(context)
    verify_bundle(path, context.trust, policy, limits, context.clock.now())
    return verify(context, record)  # then as now: the manifest's fields into the record


@contextlib.contextmanager
def verifying_as_before() -> Iterator[None]:
    HANDLERS[State.VERIFYING] = verify_as_before
    try:
        yield
    finally:
        HANDLERS[State.VERIFYING] = verify


def make_bundle(tmp: Path, size_mib: int, release: SigningKey) -> Path:
    """The digits MLP converted for PROFILE, padded with random weights to `size_mib` MiB."""
    features, _ = datasets.digits_tabular()
    calibration = tmp / "calibration.npz"
    np.savez(calibration, features=features[datasets.split(len(features)).calibration])
    model = tmp / "model"
    options = ConvertOptions(target=PROFILE, calibration=calibration, candidate="float")
    convert(MODELS / "digits_mlp.onnx", model, options)
    used = sum(p.stat().st_size for p in model.rglob("*") if p.is_file())
    remaining = max(size_mib * MIB - used, 0)
    with open(model / "weights.bin", "wb") as out:  # chunked: constant memory
        while remaining > 0:
            chunk = min(WRITE_CHUNK, remaining)
            out.write(os.urandom(chunk))
            remaining -= chunk
    bundle = tmp / "bench.efb"
    build_bundle(model, bundle, name="bench", version="1.0.0", keys=[release])
    shutil.rmtree(model)
    return bundle


def bytes_read() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no rchar")


def timed_install(
    config: AgentConfig, trust: TrustRoot, install: Callable[[Installer], object]
) -> tuple[float, int]:
    """Seconds and bytes read by one install on a fresh state directory."""
    shutil.rmtree(config.state_dir, ignore_errors=True)
    installer = Installer(config, StateLayout(config.state_dir), trust, HttpFetcher())
    read_before, start = bytes_read(), time.perf_counter()
    status = install(installer)
    seconds, read = time.perf_counter() - start, bytes_read() - read_before
    if getattr(status, "state", None) is not State.COMMITTED:
        raise RuntimeError(f"the install did not commit: {status}")
    return seconds, read


def directive_for(bundle: Path, url: str, server: SigningKey) -> bytes:
    length, sha256 = file_sha256(bundle)
    issued = utcnow() - dt.timedelta(minutes=1)
    directive = Directive(
        device_id="cam-01",
        sequence=1,
        issued=format_time(issued),
        expires=format_time(issued + dt.timedelta(hours=1)),
        action="install",
        bundle=BundleRef(name="bench", version="1.0.0", sha256=sha256, length=length),
        sources=[HttpSource(url=url)],
    )
    return sign_directive(directive, [server])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    keys = KeySet(SigningKey.generate(), SigningKey.generate(), SigningKey.generate())
    trust = make_trust_root(keys)
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-install-") as directory:
        tmp = Path(directory)
        bundle = make_bundle(tmp, args.size_mib, keys.release)
        size = bundle.stat().st_size
        config = device_config(tmp / "device", trust.raw)
        server = FileServer(bundle)
        try:
            data = directive_for(bundle, server.url, keys.server)
            installs: dict[str, Callable[[Installer], object]] = {
                "install_file": lambda installer: installer.install_file(bundle),
                "directive, HTTP fetch": lambda installer: installer.install_directive(data),
            }
            results: dict[tuple[str, str], list[tuple[float, int]]] = {}
            peer: list[float] = []
            for _ in range(args.rounds):  # alternate, so drift in machine load hits all alike
                for name, install in installs.items():
                    with verifying_as_before():
                        before = timed_install(config, trust, install)
                    results.setdefault((name, "before"), []).append(before)
                    after = timed_install(config, trust, install)
                    results.setdefault((name, "after"), []).append(after)
                start = time.perf_counter()
                subprocess.run(["sha256sum", str(bundle)], check=True, stdout=subprocess.DEVNULL)
                peer.append(time.perf_counter() - start)
        finally:
            server.close()

    def median(name: str, variant: str) -> tuple[float, float]:
        runs = results[(name, variant)]
        return statistics.median(s for s, _ in runs), statistics.median(r for _, r in runs) / size

    table: list[list[object]] = [
        ["install", "before (s)", "reads", "after (s)", "reads", "after/before"]
    ]
    for name in installs:
        (before_s, before_reads), (after_s, after_reads) = (
            median(name, "before"),
            median(name, "after"),
        )
        table.append(
            [
                name,
                f"{before_s:.2f}",
                f"{before_reads:.1f}",
                f"{after_s:.2f}",
                f"{after_reads:.1f}",
                f"{after_s / before_s:.2f}",
            ]
        )
    table.append(["peer: sha256sum", f"{statistics.median(peer):.2f}", "1.0", "", "", ""])
    print(f"bundle {size / MIB:.1f} MiB, median of {args.rounds} rounds")
    print(format_columns(table, rule=True))


if __name__ == "__main__":
    main()
