"""The provenance a registered model carries: which commit, and whether the tree differed from it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from iris_pipelines import hooks


def _git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=root, check=True)


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    _git(tmp_path, "init", "-q")
    (tmp_path / ".gitignore").write_text("data/\n")
    (tmp_path / "nodes.py").write_text("x = 1\n")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-qm", "first")
    return tmp_path


def test_a_clean_checkout_and_ignored_data_are_clean(checkout: Path) -> None:
    (checkout / "data").mkdir()
    (checkout / "data" / "scan.nii.gz").write_bytes(b"x")
    state = hooks.git_state(checkout)
    assert len(state["git_commit"]) == 40 and state["git_dirty"] == "false"


def test_a_new_source_file_never_committed_is_dirty(checkout: Path) -> None:
    (checkout / "extra_node.py").write_text("y = 2\n")
    assert hooks.git_state(checkout)["git_dirty"] == "true"


def test_a_status_that_fails_is_unknown_not_clean(checkout: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_run = subprocess.run

    def slow_status(args, **kwargs):
        if "status" in args:
            raise subprocess.TimeoutExpired(args, 10)
        return real_run(args, **kwargs)

    monkeypatch.setattr(hooks.subprocess, "run", slow_status)
    (checkout / "nodes.py").write_text("x = 2\n")
    assert hooks.git_state(checkout)["git_dirty"] == "unknown"


def test_a_run_started_in_a_subfolder_works_from_the_project_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Relative paths in parameters and mlflow.yml would otherwise follow the subfolder."""
    from types import SimpleNamespace

    (tmp_path / "notebooks").mkdir()
    monkeypatch.chdir(tmp_path / "notebooks")
    hooks.ProjectRootHooks().after_context_created(SimpleNamespace(project_path=tmp_path))
    assert Path.cwd().resolve() == tmp_path.resolve()
