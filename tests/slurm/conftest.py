"""A real single-node SLURM cluster (slurm/local-cluster/start.sh) for the whole session.

Under CI=true a missing SLURM install fails the run: these tests are the only proof of the hpcc path and
must never be skipped silently. Elsewhere they skip when sbatch is absent.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[2]
LOCAL_CLUSTER = PROJECT_ROOT / "slurm" / "local-cluster"


def _missing_slurm() -> str | None:
    missing = [tool for tool in ("sbatch", "slurmctld", "slurmd", "munged") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not found (apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "the local SLURM cluster needs root"
    return None


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[dict[str, str]]:
    """Starts the cluster once, points every SLURM client of the session at it, stops it at the end."""
    problem = _missing_slurm()
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(f"SLURM tests must run in CI: {problem}")
        pytest.skip(problem)
    # Not under pytest's tmp_path: its 0700 folders stop munged (stop.sh removes this one).
    state = tempfile.mkdtemp(prefix="iris-local-slurm-")
    started = subprocess.run(
        ["bash", str(LOCAL_CLUSTER / "start.sh"), state],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert started.returncode == 0, f"local SLURM cluster did not start:\n{started.stderr}"
    env = dict(line.removeprefix("export ").split("=", 1) for line in started.stdout.splitlines())
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)  # sbatch/scontrol from the tests and from `kedro run` subprocesses
    try:
        yield env
    finally:
        stopped = subprocess.run(
            ["bash", str(LOCAL_CLUSTER / "stop.sh"), state],
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        assert stopped.returncode == 0, f"local SLURM cluster did not stop cleanly:\n{stopped.stderr}"
