"""Run by the emulated root's Python: the agent's smoke test on one staged version.

Usage: python3 -P guest.py CORE_DIR AGENT_DIR VERSION_DIR. Prints one JSON
line: {"passed": true, "runtime": ..., "samples": N} or {"failed": reason}. The agent's
smoke-test module is loaded by its file, not through its package, whose
installer needs more than the root holds; so the check is the agent's own,
not a copy.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType


def _load(name: str, path: Path, package: bool = False) -> ModuleType:
    locations = [str(path.parent)] if package else None
    spec = importlib.util.spec_from_file_location(name, path, submodule_search_locations=locations)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _runtime(version: Path) -> str:
    from edgefleet.bundlefiles import SERVED_ONNX
    from edgefleet.litert import interpreter_class

    if (version / SERVED_ONNX).is_file():
        import onnxruntime

        return f"onnxruntime {onnxruntime.__version__}"
    return interpreter_class()[1]


def main(core: Path, agent: Path, version: Path) -> dict[str, object]:
    _load("edgefleet", core / "__init__.py", package=True)
    _load("edgefleet.agent", agent / "__init__.py", package=True)
    smoke = _load("edgefleet.agent.install.smoke", agent / "install" / "smoke.py")
    try:
        smoke.run_smoke_test(version)
    except smoke.SmokeTestError as exc:
        return {"failed": str(exc)}
    from edgefleet.bundlefiles import SMOKE_SPEC_FILE, SmokeSpec

    spec = SmokeSpec.model_validate_json((version / SMOKE_SPEC_FILE).read_bytes())
    return {"passed": True, "runtime": _runtime(version), "samples": spec.samples}


if __name__ == "__main__":
    print(json.dumps(main(*(Path(arg) for arg in sys.argv[1:4]))))
