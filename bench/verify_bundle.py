"""Benchmark: how fast, and in how little memory, a device verifies a large bundle.

It builds a signed bundle of --size-mib MiB (one random model-like file plus a
few small ones) in a temporary directory, then measures `verify_bundle`:

- hashing throughput: `verify_bundle`'s MiB/s against coreutils `sha256sum`
  over the same bundle file, alternating rounds, median of each. Goal: at
  least 0.8x sha256sum. The file is read from a warm page cache (it is read
  once before the rounds), so this compares CPU cost, not the disk.
  A second peer, `openssl dgst -sha256`, is timed the same way and shown for
  information only (no goal): coreutils sha256sum on some systems (e.g.
  Debian's 9.1) is not built with OpenSSL and lacks hardware SHA, so it is a
  weak peer there, while openssl uses SHA-NI / ARMv8 SHA like Python's
  hashlib. It is skipped, with a note, if `openssl` is not on PATH.
- peak memory: `verify_bundle` runs in a fresh child Python process, and its
  peak RSS is compared with a bare child Python that only imports
  edgefleet.bundle. Goal: under 100 MiB. Each child reports its own VmHWM
  from /proc/self/status: ru_maxrss from wait4 is no good here, because Linux
  carries the parent's RSS at fork into the child's ru_maxrss across exec, so
  both children would read as large as this (~50 MiB) benchmark process.

`verify_bundle` is timed inside the child (interpreter start and imports
excluded); the peers are timed around their processes (start-up is a few ms).
The temporary directory is removed at the end, on error, Ctrl-C or SIGTERM.
Exit status 1 means a goal was missed.

    PYTHONPATH=. python bench/verify_bundle.py [--size-mib 1024] [--workdir DIR] [--json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import edgefleet
from edgefleet.bundle import build_bundle
from edgefleet.keys import SigningKey
from edgefleet.tables import format_columns
from edgefleet.trust import build_trust_root_signed, sign_trust_root

MIB = 1024 * 1024
WRITE_CHUNK = 4 * MIB
THROUGHPUT_GOAL = 0.8  # verify MiB/s over sha256sum MiB/s
RSS_GOAL_MIB = 100.0
PROFILE = "bench-board"

# Child programs, run with `python -c`; each prints one JSON object with its peak RSS.
PEAK_RSS_KIB = "int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])"
BASELINE_CHILD = f"""
import json
import edgefleet.bundle
print(json.dumps({{"rss_kib": {PEAK_RSS_KIB}}}))
"""
VERIFY_CHILD = f"""
import json, sys, time
from pathlib import Path
from edgefleet.bundle import BundleLimits, BundlePolicy, verify_bundle
from edgefleet.trust import load_trust_root
bundle, trust_path, max_bytes = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
trust = load_trust_root(trust_path)
start = time.perf_counter()
verified = verify_bundle(
    bundle, trust, BundlePolicy(profile={PROFILE!r}), BundleLimits(max_bundle_bytes=max_bytes)
)
seconds = time.perf_counter() - start
print(json.dumps({{"seconds": seconds, "bytes": verified.size, "rss_kib": {PEAK_RSS_KIB}}}))
"""


def write_source(src: Path, total_bytes: int) -> None:
    """A model directory: small text files plus one random `model.onnx` filling up the total
    (never loaded; a bundle must hold a model to serve)."""
    small = {
        "config.json": json.dumps({"arch": "bench", "layers": 24, "dtype": "int8"}).encode(),
        "labels.txt": "\n".join(f"class_{i}" for i in range(1000)).encode(),
        "tokenizer/vocab.txt": "\n".join(f"token{i}" for i in range(5000)).encode(),
    }
    for name, data in small.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    remaining = total_bytes - sum(len(data) for data in small.values())
    with open(src / "model.onnx", "wb") as out:  # chunked: the benchmark stays in constant memory
        while remaining > 0:
            chunk = min(WRITE_CHUNK, remaining)
            out.write(os.urandom(chunk))
            remaining -= chunk


def make_bundle(tmp: Path, size_mib: int) -> tuple[Path, Path, float]:
    """Keys, a trust root and a bundle under `tmp`; returns (bundle, trust root, build seconds)."""
    root_key, release_key, server_key = (SigningKey.generate() for _ in range(3))
    signed = build_trust_root_signed(
        version=1,
        expires=dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=1),
        root=[root_key.public],
        release=[release_key.public],
        server=[server_key.public],
    )
    trust_path = tmp / "trust-root.json"
    trust_path.write_bytes(sign_trust_root(signed, [root_key]).raw)
    src = tmp / "src"
    src.mkdir()
    write_source(src, size_mib * MIB)
    bundle = tmp / "model.bundle"
    start = time.perf_counter()
    build_bundle(
        src, bundle, name="bench-model", version="1.0.0", keys=[release_key], profiles=[PROFILE]
    )
    build_seconds = time.perf_counter() - start
    shutil.rmtree(src)  # only the bundle need stay in the page cache
    return bundle, trust_path, build_seconds


def run_child(argv: list[str]) -> tuple[dict[str, Any], float]:
    """Run a child Python to completion; return its JSON output and its peak RSS in MiB."""
    env = dict(os.environ)  # the child must import the same edgefleet as this process
    package_parent = str(Path(edgefleet.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, env.get("PYTHONPATH")]))
    done = subprocess.run(argv, check=True, stdout=subprocess.PIPE, env=env)
    result = json.loads(done.stdout)
    return result, result["rss_kib"] / 1024


def time_peer(argv: list[str], path: Path) -> float:
    """Seconds for a peer hashing command to run over `path`, process start-up included."""
    start = time.perf_counter()
    subprocess.run([*argv, str(path)], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def warm_page_cache(path: Path) -> None:
    with open(path, "rb") as handle:
        while handle.read(WRITE_CHUNK):
            pass


def mem_available_mib() -> float:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def measure(tmp: Path, size_mib: int, rounds: int) -> dict[str, Any]:
    bundle, trust_path, build_seconds = make_bundle(tmp, size_mib)
    bundle_bytes = bundle.stat().st_size
    warm_page_cache(bundle)
    verify_argv = [sys.executable, "-c", VERIFY_CHILD, str(bundle), str(trust_path)]
    verify_argv.append(str(bundle_bytes))
    _, baseline_rss = run_child([sys.executable, "-c", BASELINE_CHILD])
    has_openssl = shutil.which("openssl") is not None
    sha_seconds: list[float] = []
    openssl_seconds: list[float] = []
    verify_seconds: list[float] = []
    verify_rss: list[float] = []
    for _ in range(rounds):  # alternate, so drift in machine load hits all alike
        sha_seconds.append(time_peer(["sha256sum"], bundle))
        if has_openssl:
            openssl_seconds.append(time_peer(["openssl", "dgst", "-sha256"], bundle))
        result, rss = run_child(verify_argv)
        if result["bytes"] != bundle_bytes:
            raise RuntimeError(f"verify read {result['bytes']} bytes of {bundle_bytes}")
        verify_seconds.append(result["seconds"])
        verify_rss.append(rss)
    bundle_mib = bundle_bytes / MIB
    sha_mibs = bundle_mib / statistics.median(sha_seconds)
    verify_mibs = bundle_mib / statistics.median(verify_seconds)
    openssl_mibs = bundle_mib / statistics.median(openssl_seconds) if has_openssl else None
    return {
        "bundle_mib": round(bundle_mib, 2),
        "mem_available_mib": round(mem_available_mib()),
        "python": sys.version.split()[0],
        "rounds": rounds,
        "build_seconds": round(build_seconds, 3),
        "build_mib_per_s": round(bundle_mib / build_seconds, 1),
        "sha256sum_seconds": [round(s, 3) for s in sha_seconds],
        "verify_seconds": [round(s, 3) for s in verify_seconds],
        "sha256sum_mib_per_s": round(sha_mibs, 1),
        "verify_mib_per_s": round(verify_mibs, 1),
        "throughput_ratio": round(verify_mibs / sha_mibs, 3),
        "throughput_goal_met": verify_mibs / sha_mibs >= THROUGHPUT_GOAL,
        # Second, informational peer (no goal); all None if openssl is not on PATH.
        "openssl_seconds": [round(s, 3) for s in openssl_seconds] if has_openssl else None,
        "openssl_mib_per_s": round(openssl_mibs, 1) if openssl_mibs else None,
        "openssl_ratio": round(verify_mibs / openssl_mibs, 3) if openssl_mibs else None,
        "baseline_rss_mib": round(baseline_rss, 1),
        "verify_rss_mib": round(max(verify_rss), 1),
        "rss_ratio": round(max(verify_rss) / baseline_rss, 2),
        "rss_goal_met": max(verify_rss) < RSS_GOAL_MIB,
    }


def print_table(r: dict[str, Any]) -> None:
    yes_no = {True: "yes", False: "NO"}
    rows = [
        ("metric", "edgefleet", "peer", "ratio", "goal", "met"),
        (
            f"verify throughput, MiB/s (median of {r['rounds']})",
            f"{r['verify_mib_per_s']:.0f}",
            f"{r['sha256sum_mib_per_s']:.0f} (sha256sum)",
            f"{r['throughput_ratio']:.2f}x",
            f">= {THROUGHPUT_GOAL}x",
            yes_no[r["throughput_goal_met"]],
        ),
        (
            "verify peak RSS, MiB (max of rounds)",
            f"{r['verify_rss_mib']:.1f}",
            f"{r['baseline_rss_mib']:.1f} (bare import)",
            f"{r['rss_ratio']:.2f}x",
            f"< {RSS_GOAL_MIB:.0f} MiB",
            yes_no[r["rss_goal_met"]],
        ),
        ("build time, s", f"{r['build_seconds']:.2f}", "-", "-", "-", "-"),
    ]
    if r["openssl_mib_per_s"] is not None:
        openssl_row = (
            "verify throughput vs openssl",
            f"{r['verify_mib_per_s']:.0f}",
            f"{r['openssl_mib_per_s']:.0f} (openssl)",
            f"{r['openssl_ratio']:.2f}x",
            "informational",
            "-",
        )
        rows.insert(2, openssl_row)
    fits = r["bundle_mib"] < r["mem_available_mib"] / 2
    cache = "it fits" if fits else "WARNING: it may not fit, figures may include disk reads"
    print(
        f"bundle {r['bundle_mib']:.1f} MiB, Python {r['python']}; read from the page cache "
        f"(warmed first; {cache}: {r['mem_available_mib']} MiB available)"
    )
    print(f"sha256sum s per round: {r['sha256sum_seconds']}; verify s: {r['verify_seconds']}")
    if r["openssl_seconds"] is None:
        print("openssl: not on PATH, second peer skipped")
    else:
        print(f"openssl dgst -sha256 s per round: {r['openssl_seconds']}")
    print(f"build: {r['build_mib_per_s']:.0f} MiB/s (hash pass + pack pass)\n")
    print(format_columns(rows, rule=True))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="bundle content size")
    parser.add_argument("--workdir", type=Path, help="where to put the temporary files")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timing rounds")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    if args.size_mib < 1 or args.rounds < 1:
        parser.error("--size-mib and --rounds must be at least 1")
    # SIGTERM becomes SystemExit so that the temporary directory is removed as on Ctrl-C.
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-", dir=args.workdir) as tmp:
        results = measure(Path(tmp), args.size_mib, args.rounds)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print_table(results)
    return 0 if results["throughput_goal_met"] and results["rss_goal_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
