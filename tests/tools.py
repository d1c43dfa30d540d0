"""External programs some tests need (Debian's prometheus, graphite-carbon,
python3-whisper): `.ci/run` installs them. Without them a test skips with
the reason on a developer's machine, and fails under CI (CI set), where a
missing server must never pass as a skip."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from types import ModuleType

import pytest

INSTALL = "apt-get install -y prometheus graphite-carbon python3-whisper"

#: where Debian's python3-whisper puts its one-file module (outside the venv)
WHISPER_PATHS = (Path("/usr/lib/python3/dist-packages/whisper.py"),)


def missing(what: str) -> None:
    """Skip (developer machine) or fail (CI) because `what` is not installed."""
    message = f"{what} is not installed ({INSTALL})"
    if os.environ.get("CI"):
        pytest.fail(message + "; under CI a missing server is a failure")
    pytest.skip(message)


def require_program(name: str) -> str:
    """The path of an installed program, or skip/fail."""
    path = shutil.which(name)
    if path is None:
        missing(f"`{name}`")
    assert path is not None
    return path


def whisper_module() -> ModuleType:
    """Debian's `whisper` module, loaded from its file (it is not in the venv)."""
    try:
        import whisper  # type: ignore[import-not-found]
    except ImportError:
        pass
    else:
        return whisper  # type: ignore[no-any-return]
    for path in WHISPER_PATHS:
        if path.exists():
            spec = importlib.util.spec_from_file_location("whisper", path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
    missing("python3-whisper")
    raise AssertionError("unreachable")
