"""The provenance a registered model carries: which commit, and whether the tree differed from it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from kedro.framework.hooks import hook_impl
from processes import catching

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


def test_a_new_source_file_is_dirty_when_git_is_told_to_hide_untracked_files(checkout: Path) -> None:
    """`status.showUntrackedFiles=no` (set for big checkouts, or globally) empties `git status`'s list."""
    _git(checkout, "config", "status.showUntrackedFiles", "no")
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


@pytest.fixture
def mlflow_store(tmp_path: Path):
    import mlflow
    from mlflow_support import temporary_mlflow_store

    with temporary_mlflow_store(tmp_path):
        yield mlflow.MlflowClient()


def test_an_interrupted_pipeline_leaves_its_run_killed_not_finished(mlflow_store) -> None:
    """Ctrl-C skips Kedro's on_pipeline_error: the exit handler ends the still-open run KILLED."""
    import mlflow

    outcome = hooks.InterruptedRunHooks()
    run = mlflow.start_run()  # what kedro-mlflow opens before the project's trylast hook
    outcome.before_pipeline_run()
    mlflow.start_run(run_id=run.info.run_id, nested=True)  # and pushes again for the running node
    outcome.end_interrupted_run()  # what atexit calls when KeyboardInterrupt ends the process
    assert mlflow.active_run() is None
    assert mlflow_store.get_run(run.info.run_id).info.status == "KILLED"


def test_a_run_left_open_in_a_notebook_is_killed_when_the_next_session_starts(mlflow_store) -> None:
    import mlflow

    outcome = hooks.InterruptedRunHooks()
    interrupted = mlflow.start_run()
    outcome.before_pipeline_run()
    outcome.after_context_created()  # the next KedroSession in the same process
    assert mlflow.active_run() is None
    assert mlflow_store.get_run(interrupted.info.run_id).info.status == "KILLED"


def test_a_finished_or_failed_pipeline_and_a_callers_own_run_are_left_alone(mlflow_store) -> None:
    import mlflow

    outcome = hooks.InterruptedRunHooks()
    with mlflow.start_run() as own:  # a caller's run, e.g. wrapping session.run in a script
        outcome.before_pipeline_run()
        outcome.after_pipeline_run()
        outcome.after_context_created()
        outcome.end_interrupted_run()
        assert mlflow.active_run().info.run_id == own.info.run_id
        outcome.before_pipeline_run()
        outcome.on_pipeline_error()
        outcome.end_interrupted_run()
        assert mlflow.active_run().info.run_id == own.info.run_id
    assert mlflow_store.get_run(own.info.run_id).info.status == "FINISHED"


def test_sigterm_exits_through_python_while_a_pipeline_runs(mlflow_store) -> None:
    """scancel and SLURM time limits send SIGTERM: it must unwind (exit handlers run), status 128 + 15."""
    import signal

    import mlflow

    outcome = hooks.InterruptedRunHooks()
    with catching(signal.SIGTERM), mlflow.start_run():
        before = signal.getsignal(signal.SIGTERM)
        outcome.before_pipeline_run()
        with pytest.raises(SystemExit) as exited:
            signal.raise_signal(signal.SIGTERM)
        assert exited.value.code == 128 + signal.SIGTERM
        outcome.after_pipeline_run()
        assert signal.getsignal(signal.SIGTERM) is before


def test_the_lock_an_environment_was_installed_from_is_read_from_its_marker(tmp_path: Path) -> None:
    assert hooks.installed_lock_sha256(tmp_path) == "unknown"  # not made by make install
    (tmp_path / ".installed").write_text("")  # made before the hash was recorded
    assert hooks.installed_lock_sha256(tmp_path) == "unknown"
    (tmp_path / ".installed").write_text("ab" * 32 + "\n")
    assert hooks.installed_lock_sha256(tmp_path) == "ab" * 32


def test_a_lock_changed_since_install_is_tagged_and_warned_about(
    checkout: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """After a `git pull` that changes requirements.lock, the packages are still the old lock's."""
    (checkout / "requirements.lock").write_text("torch==2.13.0\n")
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / ".installed").write_text(hooks.file_sha256(checkout / "requirements.lock"))
    monkeypatch.setattr(hooks.sys, "prefix", str(venv))
    tags = hooks.provenance_tags(checkout, env=None)
    assert tags["installed_lock_sha256"] == tags["lockfile_sha256"] and not caplog.text
    (checkout / "requirements.lock").write_text("torch==2.14.0\n")
    tags = hooks.provenance_tags(checkout, env=None)
    assert tags["installed_lock_sha256"] != tags["lockfile_sha256"]
    assert "was installed from another requirements.lock than the checkout's" in caplog.text


def test_a_run_under_nohup_survives_the_terminal_closing(mlflow_store) -> None:
    import signal

    import mlflow

    outcome = hooks.InterruptedRunHooks()
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with catching(signal.SIGTERM), mlflow.start_run():
            outcome.before_pipeline_run()
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN  # nohup's choice stands
            assert signal.getsignal(signal.SIGTERM) is hooks._exit_on_signal
            outcome.after_pipeline_run()
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


@pytest.fixture
def episodes_copy(tmp_path: Path, collection) -> Path:
    from mlflow_support import episodes_project

    return episodes_project(tmp_path / "project", collection[0])


def test_two_sessions_in_one_process_make_two_finished_runs(episodes_copy: Path) -> None:
    """A notebook or a sweep script runs one KedroSession after another: each `kedro run` is its own
    MLflow run, FINISHED with its own parameters, and none stays active for the next session to log into
    (the second one failed with "Changing param values is not allowed")."""
    import mlflow
    from mlflow_support import in_process_sessions, project_runs

    with in_process_sessions(episodes_copy) as session:
        for seed in (0, 1):
            with session(runtime_params={"episodes": {"seed": seed}}) as each:
                each.run(pipeline_names=["episodes"])
            assert mlflow.active_run() is None
    runs = project_runs(episodes_copy)
    assert [(run.info.status, run.data.params["episodes.seed"]) for run in runs] == [
        ("FINISHED", "0"),
        ("FINISHED", "1"),
    ]
    assert runs[0].data.tags["run_id"] != runs[1].data.tags["run_id"]  # one Kedro session each


def test_a_run_that_fails_before_its_pipeline_starts_ends_failed(
    episodes_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kedro reports only the pipeline's own errors to on_pipeline_error: a hook failing after kedro-mlflow
    opened the run (the lock file cannot be logged to a full or unreachable artifact store) left the run
    open, and MLflow's exit handler then recorded it FINISHED."""
    import mlflow
    from mlflow_support import in_process_sessions, project_runs

    def full_store(*args, **kwargs) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mlflow, "log_artifact", full_store)
    with in_process_sessions(episodes_copy) as session:
        with session() as failing, pytest.raises(OSError, match="No space left"):
            failing.run(pipeline_names=["episodes"])
        assert mlflow.active_run() is None
    assert [run.info.status for run in project_runs(episodes_copy)] == ["FAILED"]


def test_a_failed_start_leaves_a_callers_own_run_open(mlflow_store) -> None:
    import mlflow
    from kedro.framework.hooks.manager import _create_hook_manager

    class Failing:
        @hook_impl
        def before_pipeline_run(self) -> None:
            raise OSError("artifact store unreachable")

    manager = _create_hook_manager()
    manager.register(hooks.FailedStartHooks())
    manager.register(Failing())
    with mlflow.start_run() as own:  # a script's own run, which kedro-mlflow then logs into
        with pytest.raises(OSError):
            manager.hook.before_pipeline_run(run_params={}, pipeline=None, catalog=None)
        assert mlflow.active_run().info.run_id == own.info.run_id
    assert mlflow_store.get_run(own.info.run_id).info.status == "FINISHED"
