"""The onnx2tf tool environment: a virtual environment of its own, built on demand.

onnx2tf needs TensorFlow and pins numpy, onnx and protobuf at versions other
than the project's, so it runs in a venv of its own under the cache directory
(`$EDGEFLEET_TOOLS_DIR`, else `$XDG_CACHE_HOME/edgefleet/tools`, else
`~/.cache/edgefleet/tools`), named after the onnx2tf version, with every package
pinned. It is built in a temporary directory beside it and renamed into place
when complete, so it is either whole or absent. `edgefleet convert
--prepare-tools` builds it ahead of time (CI does); a conversion that needs it
builds it when it is missing, and refuses with that command when it cannot
(no network, no PyPI).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from edgefleet.converter.errors import ConverterError
from edgefleet.converter.progress import Progress

ONNX2TF_VERSION = "1.29.24"
# Resolved together by pip. tensorflow-cpu rather than tensorflow: no CUDA libraries.
REQUIREMENTS = (
    "tensorflow-cpu==2.19.0",
    "protobuf==5.29.6",
    "numpy==1.26.4",
    "onnx==1.19.1",
    "onnxruntime==1.23.0",
    "onnx-graphsurgeon==0.5.8",
    "sng4onnx==1.0.5",
    "ai-edge-litert==2.1.0",
    "psutil==5.9.5",
    "ml-dtypes==0.5.1",
    "h5py==3.11.0",
)
# Installed without their dependencies: onnx2tf pins the GPU build of TensorFlow and
# tf-keras depends on it, where tensorflow-cpu (above) provides the same modules.
WITHOUT_DEPENDENCIES = (f"onnx2tf=={ONNX2TF_VERSION}", "tf-keras==2.19.0")
PREPARE_COMMAND = "edgefleet convert --prepare-tools"


class ToolMissingError(ConverterError):
    """A conversion tool's environment is missing and could not be built."""


def tools_home() -> Path:
    if configured := os.environ.get("EDGEFLEET_TOOLS_DIR"):
        return Path(configured)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "edgefleet" / "tools"


def onnx2tf_env() -> Path:
    return tools_home() / f"onnx2tf-{ONNX2TF_VERSION}"


def onnx2tf_python() -> Path | None:
    """The tool environment's interpreter, when the environment is built."""
    python = onnx2tf_env() / "bin" / "python"
    return python if python.exists() else None


def _run(*command: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("ERROR")] or lines
        why = errors[-1][:300] if errors else f"{command[2]} failed"
        raise ToolMissingError(
            f"could not build the onnx2tf tool environment in {onnx2tf_env()} ({why}): run "
            f"`{PREPARE_COMMAND}` on a machine that reaches PyPI (about 375 MB to download, "
            "1.7 GB installed)"
        )


def prepare_onnx2tf(progress: Progress) -> Path:
    """The tool environment's interpreter, building the environment first if it is missing.

    Raises:
        ToolMissingError: the environment is missing and could not be built.
    """
    found = onnx2tf_python()
    if found is not None:
        return found
    target = onnx2tf_env()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    progress.start(f"building the onnx2tf tool environment in {target} (a few minutes)", 1)
    try:
        _run(sys.executable, "-m", "venv", str(staging))
        python = str(staging / "bin" / "python")
        pip = (python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check")
        _run(*pip, *REQUIREMENTS)
        _run(*pip, "--no-deps", *WITHOUT_DEPENDENCIES)
        try:
            staging.rename(target)
        except OSError:  # built meanwhile by another conversion: keep that one
            if onnx2tf_python() is None:
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        progress.finish()
    return target / "bin" / "python"
