"""The provenance a registered model carries: which commit, and whether the tree differed from it."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from kedro.framework.hooks import hook_impl
from kedro.framework.hooks.manager import _create_hook_manager
from processes import catching

from iris_pipelines import hooks


def _hooks(*plugins: object):
    """Kedro's hook manager with ``plugins`` registered, as a session calls them (hook wrappers included)."""
    manager = _create_hook_manager()
    for plugin in plugins:
        manager.register(plugin)
    return manager.hook


PIPELINE = {"run_params": {}, "pipeline": None, "catalog": None}  # what Kedro passes the pipeline hooks


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
    (tmp_path / "notebooks").mkdir()
    monkeypatch.chdir(tmp_path / "notebooks")
    _hooks(hooks.ProjectRootHooks()).after_context_created(context=SimpleNamespace(project_path=tmp_path))
    assert Path.cwd().resolve() == tmp_path.resolve()


def test_new_hooks_after_a_package_reload_still_give_back_the_exported_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`%reload_kedro` re-imports the package, so the next session's hooks are new objects; what
    kedro-mlflow exported for the last project must still be taken back, or the next project's
    `${env_or:MLFLOW_TRACKING_URI,…}` reads the last one's store."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "recorded for teardown")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path)
    context = SimpleNamespace(project_path=tmp_path)

    class ExportsLikeKedroMlflow:
        @hook_impl
        def after_context_created(self) -> None:
            os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path}/first/mlflow.db"

    _hooks(hooks.ProjectRootHooks(), ExportsLikeKedroMlflow()).after_context_created(context=context)
    assert os.environ["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path}/first/mlflow.db"
    _hooks(hooks.ProjectRootHooks()).after_context_created(context=context)  # the reloaded package's
    assert "MLFLOW_TRACKING_URI" not in os.environ


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
    hook = _hooks(outcome)
    with mlflow.start_run() as own:  # a caller's run, e.g. wrapping session.run in a script
        outcome.before_pipeline_run()
        hook.after_pipeline_run(run_result={}, **PIPELINE)
        outcome.after_context_created()
        outcome.end_interrupted_run()
        assert mlflow.active_run().info.run_id == own.info.run_id
        outcome.before_pipeline_run()
        hook.on_pipeline_error(error=ValueError("a node failed"), **PIPELINE)
        outcome.end_interrupted_run()
        assert mlflow.active_run().info.run_id == own.info.run_id
    assert mlflow_store.get_run(own.info.run_id).info.status == "FINISHED"


def test_sigterm_exits_through_python_while_a_pipeline_runs(mlflow_store) -> None:
    """scancel and SLURM time limits send SIGTERM: it must unwind (exit handlers run), status 128 + 15."""
    import mlflow

    outcome = hooks.InterruptedRunHooks()
    with catching(signal.SIGTERM), mlflow.start_run():
        before = signal.getsignal(signal.SIGTERM)
        outcome.before_pipeline_run()
        with pytest.raises(SystemExit) as exited:
            signal.raise_signal(signal.SIGTERM)
        assert exited.value.code == 128 + signal.SIGTERM
        _hooks(outcome).after_pipeline_run(run_result={}, **PIPELINE)
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
    import mlflow

    outcome = hooks.InterruptedRunHooks()
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with catching(signal.SIGTERM), mlflow.start_run():
            outcome.before_pipeline_run()
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN  # nohup's choice stands
            assert signal.getsignal(signal.SIGTERM) is hooks._exit_on_signal
            _hooks(outcome).after_pipeline_run(run_result={}, **PIPELINE)
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


def _fails_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tracking store fails the next request that ends a run (a server restarting, a locked SQLite)."""
    import mlflow

    real = mlflow.MlflowClient.set_terminated
    calls = []

    def flaky(self, run_id: str, *args, **kwargs) -> None:
        calls.append(run_id)
        if len(calls) == 1:
            raise ConnectionError("tracking store unavailable")
        real(self, run_id, *args, **kwargs)

    monkeypatch.setattr(mlflow.MlflowClient, "set_terminated", flaky)


def test_a_run_whose_end_fails_ends_failed_and_gives_the_signals_back(
    episodes_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kedro-mlflow's after_pipeline_run failing to end the run (pluggy calls it before the project's hooks)
    left the run RUNNING in the store for ever, and the run's SIGTERM/SIGHUP handlers in the process."""
    import mlflow
    from mlflow_support import in_process_sessions, project_runs

    with in_process_sessions(episodes_copy) as session, catching(signal.SIGTERM):
        before = signal.getsignal(signal.SIGTERM)
        _fails_once(monkeypatch)
        with session() as failing, pytest.raises(ConnectionError, match="tracking store unavailable"):
            failing.run(pipeline_names=["episodes"])
        assert mlflow.active_run() is None
        assert signal.getsignal(signal.SIGTERM) is before
        with session() as next_one:  # the next session of the process gets a run of its own
            next_one.run(pipeline_names=["episodes"])
    assert [run.info.status for run in project_runs(episodes_copy)] == ["FAILED", "FINISHED"]


def test_a_run_that_cannot_be_ended_at_all_is_named_in_the_log(
    mlflow_store, caplog: pytest.LogCaptureFixture
) -> None:
    import mlflow

    class EndsTheRun:  # kedro-mlflow's after_pipeline_run
        @hook_impl
        def after_pipeline_run(self) -> None:
            mlflow.end_run()

    def unreachable(*args, **kwargs) -> None:
        raise ConnectionError("tracking store unavailable")

    outcome = hooks.InterruptedRunHooks()
    with catching(signal.SIGTERM):
        before = signal.getsignal(signal.SIGTERM)
        run = mlflow.start_run()
        outcome.before_pipeline_run()
        with pytest.MonkeyPatch.context() as patch, pytest.raises(ConnectionError):
            patch.setattr(mlflow.MlflowClient, "set_terminated", unreachable)
            _hooks(outcome, EndsTheRun()).after_pipeline_run(run_result={}, **PIPELINE)
        assert signal.getsignal(signal.SIGTERM) is before
    assert mlflow.active_run() is None
    assert f"MLflow run {run.info.run_id} could not be ended (tracking store unavailable)" in caplog.text
    assert mlflow_store.get_run(run.info.run_id).info.status == "RUNNING"


def test_a_hook_failing_as_the_pipeline_ends_leaves_a_callers_own_run_open(mlflow_store) -> None:
    import mlflow

    class Failing:
        @hook_impl
        def after_pipeline_run(self) -> None:
            raise OSError("artifact store unreachable")

    outcome = hooks.InterruptedRunHooks()
    hook = _hooks(outcome, Failing())
    with mlflow.start_run() as own:  # a script's own run, which kedro-mlflow then logs into
        hook.after_context_created(context=None)
        outcome.before_pipeline_run()
        with pytest.raises(OSError):
            hook.after_pipeline_run(run_result={}, **PIPELINE)
        assert mlflow.active_run().info.run_id == own.info.run_id
    assert mlflow_store.get_run(own.info.run_id).info.status == "FINISHED"


def test_two_projects_in_one_process_keep_their_own_stores(tmp_path: Path, collection) -> None:
    """A notebook comparing two projects wrote the second one's run into the first one's mlflow.db: MLflow
    caches a store per URI string (the relative sqlite:///mlflow.db), and the second session's mlflow.yml
    took the MLFLOW_TRACKING_URI kedro-mlflow had exported for the first for the user's. A store the user
    exported is still used by both."""
    import mlflow
    from mlflow_support import episodes_project, in_process_sessions, project_runs

    projects = [episodes_project(tmp_path / name, collection[0]) for name in ("first", "second")]
    shared = tmp_path / "shared.db"
    with in_process_sessions(projects[0]) as session:
        for project in projects:
            with session(project=project) as each:
                each.run(pipeline_names=["episodes"])
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{shared}"
        for project in projects:
            with session(project=project) as each:
                each.run(pipeline_names=["episodes"])
        assert os.environ["MLFLOW_TRACKING_URI"] == f"sqlite:///{shared}"
    for project in projects:
        (run,) = project_runs(project)
        assert run.info.status == "FINISHED" and run.info.artifact_uri.startswith(str(project))
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{shared}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 2


@pytest.fixture
def refused_port() -> int:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        return closed.getsockname()[1]


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A server that accepts connections and never answers (overloaded, or behind a half-open firewall)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield server.getsockname()[1]


@pytest.mark.parametrize(("server", "reason"), [("refused_port", "Connection refused"),
                                                ("silent_port", "no answer within 1 s")])  # fmt: skip
def test_an_unreachable_tracking_server_fails_the_run_in_seconds(
    episodes_copy: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest, server: str,
    reason: str,
) -> None:  # fmt: skip
    """MLflow's retries kept `kedro run --env=hpcc` waiting 4 (refused) to 20 minutes (no answer) before it
    failed, a SLURM allocation's time."""
    import mlflow
    from mlflow_support import in_process_sessions

    uri = f"http://127.0.0.1:{request.getfixturevalue(server)}"
    monkeypatch.setenv(hooks.HEALTH_TIMEOUT_ENV, "1")
    with in_process_sessions(episodes_copy) as session:
        os.environ["MLFLOW_TRACKING_URI"] = uri
        started = time.monotonic()
        with session(env="hpcc") as failing, pytest.raises(hooks.TrackingServerUnreachable) as raised:
            failing.run(pipeline_names=["episodes"])
        assert time.monotonic() - started < 20
        assert mlflow.active_run() is None
    assert str(raised.value) == (
        f"MLflow tracking server {uri} is unreachable ({reason}): start it or fix MLFLOW_TRACKING_URI, which "
        "conf/hpcc/mlflow.yml reads"
    )


def test_an_env_missing_its_tracking_uri_variable_fails_in_one_line(
    episodes_copy: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`kedro run --env=hpcc` without MLFLOW_TRACKING_URI said so only at the end of a 100-line traceback
    of the config resolution inside kedro-mlflow's hook; a click error is the one line kedro prints."""
    import click
    import mlflow
    from mlflow_support import in_process_sessions

    with in_process_sessions(episodes_copy) as session:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        with session(env="hpcc") as failing, pytest.raises(click.ClickException) as raised:
            failing.run(pipeline_names=["episodes"])
        assert mlflow.active_run() is None
        mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/notebook.db")
        with mlflow.start_run():  # a caller's own run: kedro-mlflow still resolves mlflow.yml first
            os.environ.pop("MLFLOW_TRACKING_URI")  # which set_tracking_uri exported
            with session(env="hpcc") as failing, pytest.raises(click.ClickException) as again:
                failing.run(pipeline_names=["episodes"])
    assert str(again.value) == str(raised.value)
    message = str(raised.value)
    assert message.startswith(
        "conf/hpcc/mlflow.yml: the environment variable MLFLOW_TRACKING_URI is not set, and this Kedro env "
        "needs it (e.g. export MLFLOW_TRACKING_URI=http://"
    )
    assert "\n" not in message and "full_key" not in message


@pytest.fixture
def answering_server() -> Iterator[tuple[int, dict]]:
    """A server answering /health with the status in ``answer["status"]`` (200 to start with)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    answer = {"status": 200, "paths": []}

    class Health(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            answer["paths"].append(self.path)
            self.send_response(answer["status"])
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    with ThreadingHTTPServer(("127.0.0.1", 0), Health) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        yield server.server_address[1], answer
        server.shutdown()


def test_the_health_check_passes_any_answer_but_a_server_error(answering_server) -> None:
    """A login the probe does not send (401) or a proxy without the route (404) is MLflow's to report; a
    5xx is a proxy in front of a stopped server, which MLflow would retry for minutes."""
    port, answer = answering_server
    for status in (200, 401, 404):
        answer["status"] = status
        hooks.check_tracking_server(f"http://127.0.0.1:{port}/mlflow/", "hpcc")
    assert answer["paths"] == ["/mlflow/health"] * 3
    answer["status"] = 503
    with pytest.raises(
        hooks.TrackingServerUnreachable, match=r"unreachable \(HTTP 503 Service Unavailable\)"
    ):
        hooks.check_tracking_server(f"http://127.0.0.1:{port}", "hpcc")


@pytest.fixture
def not_http_port() -> Iterator[int]:
    """A port where something other than an HTTP server answers (another service, a wrong port)."""
    server = socket.create_server(("127.0.0.1", 0))

    def answer() -> None:
        with contextlib.suppress(OSError):
            while True:
                connection, _ = server.accept()
                with connection:
                    connection.recv(1024)
                    connection.sendall(b"NOT HTTP AT ALL\r\n")

    threading.Thread(target=answer, daemon=True).start()
    with server:
        yield server.getsockname()[1]


def test_the_health_check_is_one_line_for_odd_servers_addresses_and_timeouts(
    not_http_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not an HTTP server, a malformed address, a timeout that is no number of seconds: the one line
    `kedro run` prints, not a traceback from http.client or urllib."""
    import click

    with pytest.raises(hooks.TrackingServerUnreachable, match=r"unreachable \(BadStatusLine: "):
        hooks.check_tracking_server(f"http://127.0.0.1:{not_http_port}", "hpcc")
    with pytest.raises(hooks.TrackingServerUnreachable, match="is unreachable"):
        hooks.check_tracking_server("http://127.0.0.1:abc", "hpcc")
    with pytest.raises(hooks.TrackingServerUnreachable, match=r"URI is malformed \(Invalid IPv6 URL\)"):
        hooks.check_tracking_server("http://[::1", "hpcc")
    for timeout in ("-1", "0", "abc", "inf"):
        monkeypatch.setenv(hooks.HEALTH_TIMEOUT_ENV, timeout)
        with pytest.raises(click.ClickException, match=f"{hooks.HEALTH_TIMEOUT_ENV}='{timeout}': expected"):
            hooks.check_tracking_server(f"http://127.0.0.1:{not_http_port}", "hpcc")


def test_the_health_check_never_sends_or_shows_a_login(refused_port: int, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(hooks.TrackingServerUnreachable) as raised:
        hooks.check_tracking_server(f"https://alice:s3cret@127.0.0.1:{refused_port}/?token=t0k", "local")
    assert str(raised.value) == (
        f"MLflow tracking server https://127.0.0.1:{refused_port} is unreachable (Connection refused): start "
        "it or fix mlflow_tracking_uri in conf/local/mlflow.yml"
    )
