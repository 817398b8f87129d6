"""`edgefleet convert`: quantize a model for a target, prove it, optionally sign it."""

from __future__ import annotations

import dataclasses
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

import click

from edgefleet.bundle import build_bundle, check_bundle_options, parse_security_floor
from edgefleet.bundle.manifest import NAME_RULE
from edgefleet.cli.errors import abort_on_termination, aborts_on_termination
from edgefleet.cli.options import (
    bundle_name_option,
    echo_json,
    json_option,
    load_signing_keys,
    passphrase_env_option,
    semver_option,
)
from edgefleet.converter.context import ConversionResult, ConvertOptions, MeasureOn
from edgefleet.converter.evaluate import Budget
from edgefleet.converter.pipeline import convert
from edgefleet.converter.report import format_table
from edgefleet.converter.toolenv import onnx2tf_env, prepare_onnx2tf
from edgefleet.errors import UsageError
from edgefleet.fileio import check_output_directory, check_output_file

_BUDGET_KEYS = {field.name: field.type for field in dataclasses.fields(Budget)}
# Fractions that must be above 0 and at most 1: (open at 0, upper bound); every other key is a
# drop, increase or deviation, finite and >= 0.
_BUDGET_RANGES = {"min_cosine": (True, 1.0), "min_top1_agreement": (True, 1.0)}


class _TerminalProgress:
    """Progress bars on a terminal; one line per stage in a log."""

    def __init__(self) -> None:
        self._bar: Any = None
        self._tty = sys.stderr.isatty()

    def start(self, label: str, total: int) -> None:
        if self._tty:
            self._bar = click.progressbar(length=total, label=label, file=sys.stderr)
            self._bar.__enter__()
        else:
            click.echo(f"{label} ({total})", err=True)

    def advance(self, count: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(count)

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None


def parse_budget(items: tuple[str, ...]) -> Budget:
    """`accuracy_drop=0.5` and the like into a Budget.

    Raises: UsageError naming the bad item: an unknown key, not a number, or out of its
    range (cosine and agreement in (0, 1]; drops, increases and deviations >= 0; finite).
    """
    values: dict[str, float] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in _BUDGET_KEYS:
            raise UsageError(
                f"--budget {item!r}: use KEY=VALUE with KEY one of {', '.join(_BUDGET_KEYS)}"
            )
        try:
            number = float(value)
        except ValueError:
            raise UsageError(f"--budget {item!r}: {value!r} is not a number") from None
        low_open, high = _BUDGET_RANGES.get(key, (False, math.inf))
        if not math.isfinite(number) or number > high or number < 0 or (low_open and number == 0):
            allowed = "in (0, 1]" if low_open else "a number >= 0"
            raise UsageError(f"--budget {item!r}: {key} must be {allowed}")
        values[key] = number
    return Budget(**values)


def _prepare_tools(context: click.Context, _: click.Parameter, value: bool) -> None:
    if value:
        with abort_on_termination():
            prepare_onnx2tf(_TerminalProgress())
        click.echo(f"onnx2tf tool environment ready: {onnx2tf_env()}")
        context.exit(0)


@click.command("convert")
@click.option(
    "--prepare-tools",
    is_flag=True,
    is_eager=True,
    expose_value=False,
    callback=_prepare_tools,
    help="Build the onnx2tf tool environment for ONNX to TFLite (once, under "
    "~/.cache/edgefleet/tools; needs PyPI) and exit.",
)
@click.argument("model", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option(
    "--target", required=True, help="Hardware profile (`edgefleet targets list`), or host."
)
@click.option(
    "--calibration",
    required=True,
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Calibration data: .npz (one array per input) or .npy.",
)
@click.option(
    "--validation",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Validation data, same form [default: the calibration data].",
)
@click.option(
    "--labels",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help=".npy of validation labels: integers classify, floats regress.",
)
@click.option(
    "--budget",
    "budget_items",
    multiple=True,
    metavar="KEY=VALUE",
    help="Accuracy budget: accuracy_drop (points, 1.0), regression_error_increase "
    "(0.05), min_cosine (0.99), min_top1_agreement (0.98), max_deviation (0.1); cosine "
    "and agreement in (0, 1], the others >= 0. Repeatable.",
)
@click.option(
    "--optimize",
    type=click.Choice(["latency", "size"]),
    default="latency",
    show_default=True,
    help="What to choose for among candidates within budget.",
)
@click.option(
    "--candidate",
    metavar="NAME",
    help="Ship this candidate instead of choosing (a name from the report, e.g. float or "
    "static-qdq-u8s8-per-channel-minmax); it is still measured and must meet the budget.",
)
@click.option(
    "--tflite",
    is_flag=True,
    help="Also try TFLite candidates (ONNX converted by onnx2tf) on a target that runs "
    "onnxruntime too; a target that runs TFLite only always gets them.",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    required=True,
    help="Output directory; with --sign, the bundle file.",
)
@click.option(
    "--sign",
    "release_key",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Release key: build and sign a bundle in one go.",
)
@click.option(
    "--name",
    callback=bundle_name_option,
    help=f"Bundle name (with --sign): {NAME_RULE}.",
)
@click.option(
    "--version",
    "version",
    callback=semver_option,
    help="Bundle version (with --sign): a semantic version, e.g. 1.4.0.",
)
@click.option(
    "--security-floor",
    metavar="COUNTER|VERSION",
    help="With --sign: once this release commits on a device, refuse releases of this name "
    "below it (as `bundle build --security-floor`).",
)
@click.option(
    "--measure-on",
    metavar="DEVICE|tag=KEY=VALUE",
    help="Time the candidates on this device, or on the online devices with this tag, of the "
    "target profile, through the fleet server (--server, --token), instead of this machine; "
    "the request is signed with the release key (--sign or --measure-key).",
)
@click.option(
    "--server",
    "server_url",
    envvar="EDGEFLEET_SERVER",
    metavar="URL",
    help="With --measure-on: the fleet server's URL (or set EDGEFLEET_SERVER).",
)
@click.option(
    "--token",
    envvar="EDGEFLEET_TOKEN",
    metavar="TOKEN",
    help="With --measure-on: an operator's API token (or set EDGEFLEET_TOKEN).",
)
@click.option(
    "--measure-key",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="With --measure-on and no --sign: the release key that signs the benchmark request.",
)
@click.option(
    "--measure-timeout",
    type=click.IntRange(min=1),
    default=1800,
    show_default=True,
    metavar="SECONDS",
    help="With --measure-on: how long to wait for the devices' figures.",
)
@click.option(
    "--measure-memory",
    type=click.IntRange(min=16),
    default=2048,
    show_default=True,
    metavar="MIB",
    help="With --measure-on: each candidate's address-space bound on the device.",
)
@passphrase_env_option
@json_option
@aborts_on_termination
def convert_command(
    model: Path,
    target: str,
    calibration: Path,
    validation: Path | None,
    labels: Path | None,
    budget_items: tuple[str, ...],
    optimize: str,
    candidate: str | None,
    tflite: bool,
    output: Path,
    release_key: Path | None,
    name: str | None,
    version: str | None,
    security_floor: str | None,
    measure_on: str | None,
    server_url: str | None,
    token: str | None,
    measure_key: Path | None,
    measure_timeout: int,
    measure_memory: int,
    passphrase_env: str | None,
    as_json: bool,
) -> None:
    """Quantize MODEL for a target, prove it, and write it with everything a device needs.

    Every quantization setting that is valid on the target is tried and
    measured against the float model on the validation data (accuracy with
    labels, output fidelity without) and timed head to head with the float
    model on this machine (with --measure-on, on a device of the target; the
    report says where each figure was measured). With --optimize latency (the
    default), the fastest candidate within the accuracy budget that is clearly
    faster than float is chosen: a model slower than the float one is never
    shipped. With --optimize size, the smallest within the budget is chosen if
    it is smaller than the float model, whatever its speed. --candidate ships
    the named candidate instead, if it meets the budget, whatever its speed. A
    quantized model carries the float model along as the device's fallback.
    See docs/converter.md.
    """
    if release_key is None and (name or version or security_floor):
        raise UsageError("--name, --version and --security-floor go with --sign")
    if release_key is not None and not (name and version):
        raise UsageError("--sign needs --name and --version for the bundle")
    floor = None if security_floor is None else parse_security_floor(security_floor)
    # Where the output goes, checked before the work (missing parents are created).
    if release_key is None:
        check_output_directory(output, "-o")
    else:
        check_output_file(output, "-o")
    if name is not None and version is not None:
        # Everything the manifest will state, checked before the conversion's work.
        check_bundle_options(name, version, security_floor=floor)
    measure = _measure_on(
        measure_on,
        server_url,
        token,
        measure_key or release_key,
        measure_timeout,
        measure_memory,
        passphrase_env,
    )
    options = ConvertOptions(
        target=target,
        calibration=calibration,
        validation=validation,
        labels=labels,
        budget=parse_budget(budget_items),
        optimize="size" if optimize == "size" else "latency",
        candidate=candidate,
        tflite=tflite,
        measure_on=measure,
    )
    if release_key is None:
        result = convert(model, output, options, _TerminalProgress())
        _summarize(result, as_json, bundle=None)
        return
    keys = load_signing_keys([release_key], passphrase_env)
    with tempfile.TemporaryDirectory(prefix="edgefleet-convert-") as scratch:
        result = convert(model, Path(scratch) / "out", options, _TerminalProgress())
        assert name is not None and version is not None
        build_bundle(
            result.out_dir, output, name=name, version=version, keys=keys, security_floor=floor
        )
        _summarize(result, as_json, bundle=output)


def _measure_on(
    target: str | None,
    server_url: str | None,
    token: str | None,
    key: Path | None,
    timeout_s: int,
    memory_mib: int,
    passphrase_env: str | None,
) -> MeasureOn | None:
    """The --measure-on settings, or None without --measure-on.

    Raises: UsageError naming what is missing.
    """
    if target is None:
        return None
    if not server_url:
        raise UsageError("--measure-on needs the fleet server: --server URL or EDGEFLEET_SERVER")
    if key is None:
        raise UsageError(
            "--measure-on needs the release key that signs the benchmark request: --sign KEY "
            "or --measure-key KEY"
        )
    if target.startswith("tag=") and "=" not in target.removeprefix("tag="):
        raise UsageError(f"--measure-on {target!r}: use DEVICE or tag=KEY=VALUE")
    return MeasureOn(
        target=target,
        server=server_url,
        token=token,
        keys=load_signing_keys([key], passphrase_env),
        timeout_s=float(timeout_s),
        max_memory_mib=memory_mib,
    )


def _summarize(result: ConversionResult, as_json: bool, bundle: Path | None) -> None:
    if as_json:
        echo_json(
            {
                **result.report,
                "out_dir": None if bundle else str(result.out_dir),
                "bundle": str(bundle) if bundle else None,
            }
        )
        return
    click.echo(format_table(result.report), nl=False)
    click.echo(f"\nwritten: {bundle if bundle else result.out_dir}")
