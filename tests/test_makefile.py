"""`make test` installs the Debian packages the suite needs, as root (a fresh container) and through sudo."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _stub(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text(f"#!/bin/bash\n{body}\n", encoding="utf-8")
    path.chmod(0o755)


@pytest.mark.parametrize("as_root", [True, False], ids=["root", "sudo"])
def test_system_packages_installs_missing_packages(tmp_path: Path, as_root: bool) -> None:
    if shutil.which("make") is None:
        pytest.fail("make is not installed: the README's commands need it")
    stubs = tmp_path / "bin"
    stubs.mkdir()
    calls = tmp_path / "calls.log"
    # Every package is missing; apt-get records its arguments and whether it runs non-interactively.
    _stub(stubs, "dpkg", "exit 1")
    _stub(stubs, "apt-get", f'echo "DEBIAN_FRONTEND=$DEBIAN_FRONTEND $*" >> {calls}')
    _stub(stubs, "id", f"echo {0 if as_root else 1000}")
    # Like sudo, env takes VAR=value words before the command.
    _stub(stubs, "sudo", f'echo sudo >> {calls}; exec env "$@"')
    environment = {**os.environ, "PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}"}

    result = subprocess.run(
        ["make", "--no-print-directory", "-C", str(ROOT), "system-packages"],
        check=False,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    lines = calls.read_text(encoding="utf-8").splitlines()
    apt_calls = [line for line in lines if line != "sudo"]
    assert len(apt_calls) == 2, lines
    assert all(line.startswith("DEBIAN_FRONTEND=noninteractive ") for line in apt_calls), apt_calls
    assert "update" in apt_calls[0]
    assert apt_calls[1].split()[-3:] == ["chromium", "slurm-wlm", "munge"]
    assert lines.count("sudo") == (0 if as_root else 2)
