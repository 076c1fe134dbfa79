"""``python -m iris_pipelines`` runs the Kedro project like ``kedro run``."""

import sys
from pathlib import Path

from kedro.utils import find_kedro_project


def main(*args, **kwargs):
    # Outside the project Kedro finds no conf/ and kedro-mlflow falls back to ./mlruns, which MLflow
    # refuses ~270 lines of traceback later: say where to run it instead. Checked before importing
    # kedro.framework, whose import already logs which logging config it uses.
    if find_kedro_project(Path.cwd()) is None:
        print(
            f"python -m iris_pipelines runs the Kedro project: run it from the project root (the folder "
            f"whose pyproject.toml has [tool.kedro]); {Path.cwd()} is not in a Kedro project",
            file=sys.stderr,
        )
        sys.exit(2)
    from kedro.framework.cli.project import run
    from kedro.framework.project import configure_project

    package_name = Path(__file__).parent.name
    configure_project(package_name)
    interactive = hasattr(sys, "ps1")
    kwargs["standalone_mode"] = not interactive
    # Kedro's own `run` command: find_run_command would take iris_pipelines.cli (the `iris` tool's) for a
    # project CLI and look for a `run` there.
    return run(*args, **kwargs)


if __name__ == "__main__":
    main()
