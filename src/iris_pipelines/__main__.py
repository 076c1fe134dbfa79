"""``python -m iris_pipelines`` runs the Kedro project like ``kedro run``."""

import sys
from pathlib import Path

from kedro.framework.cli.project import run
from kedro.framework.project import configure_project


def main(*args, **kwargs):
    package_name = Path(__file__).parent.name
    configure_project(package_name)
    interactive = hasattr(sys, "ps1")
    kwargs["standalone_mode"] = not interactive
    # Kedro's own `run` command: find_run_command would take iris_pipelines.cli (the `iris` tool's) for a
    # project CLI and look for a `run` there.
    return run(*args, **kwargs)


if __name__ == "__main__":
    main()
