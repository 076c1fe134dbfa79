"""The SLURM launcher's parts that need no cluster: the stop hook of the train loop, the metrics file,
the watcher, memory sizing and the hpcc_local env composition. These run everywhere (no `slurm` marker)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import time
import types
from pathlib import Path

import pytest
import yaml
from processes import catching
from training_synthetic import fast_train_config, tiny_model_config

import iris_pipelines.launch.slurm as slurm_launcher
from iris_pipelines.launch.slurm import (
    MetricsTail,
    SlurmJobError,
    _Interrupt,
    _memory_per_node,
    _StopFlag,
    _Watcher,
    run_slurm,
)
from iris_pipelines.training import latest_checkpoint, run_training
from iris_pipelines.training.loop import TrainingInterrupted

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def test_a_stop_request_checkpoints_and_the_rerun_ends_where_an_uninterrupted_run_does(
    collection, tmp_path, one_torch_thread
):
    manifest, index = collection
    kwargs = {
        "model_config": tiny_model_config(),
        "train_config": fast_train_config(steps=3),
        "episode_index": index,
        "preprocessed_manifest": manifest,
    }
    straight = run_training(**kwargs, checkpoint_dir=tmp_path / "straight")

    calls = []
    with pytest.raises(TrainingInterrupted) as stopped:
        run_training(
            **kwargs, checkpoint_dir=tmp_path / "stopped", stop_requested=lambda: calls.append(1) or True
        )
    assert stopped.value.step == 1 and len(calls) == 1
    assert latest_checkpoint(tmp_path / "stopped").name == "step_00000001.pt"
    resumed = run_training(**kwargs, checkpoint_dir=tmp_path / "stopped", stop_requested=lambda: False)
    assert resumed.final_step == 3
    assert resumed.weights_checksum == straight.weights_checksum


def test_the_warning_signal_wins_over_sigterm():
    flag = _StopFlag()
    assert not flag()
    flag.handler(signal.SIGTERM, None)
    assert flag.reason == "terminate"
    flag.handler(signal.SIGUSR2, None)  # preemption look-alike: TERM then USR2 -> requeue
    flag.handler(signal.SIGTERM, None)  # the requeue's own TERM must not turn it back
    assert flag() and flag.reason == "warning"


def test_metrics_tail_reads_whole_lines_once(tmp_path):
    path = tmp_path / "metrics.jsonl"
    tail = MetricsTail(path)
    assert list(tail) == []
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    assert list(tail) == [{"step": 1, "loss": 2.0}]
    with path.open("a", encoding="utf-8") as handle:
        handle.write('ss": 1.5}\n')
    assert list(tail) == [{"step": 2, "loss": 1.5}]
    assert list(tail) == []


def test_watcher_forwards_each_step_once_and_stops_on_give_up():
    seen = []
    watcher = _Watcher("7", steps=4, on_metrics=seen.append)
    for record in (
        {"event": "started", "attempt": 0, "world_size": 2, "master": "n1:1"},
        {"step": 1, "loss": 1.0, "samples_per_s": 2.0},
        {"step": 2, "loss": 0.9, "samples_per_s": 2.0},
        {"event": "interrupted", "step": 2, "reason": "warning", "action": "requeue", "attempt": 0},
        {"step": 2, "loss": 0.9, "samples_per_s": 2.0},  # resumed from an older checkpoint: a repeat
        {"step": 2, "dataset": "alpha", "dice": 0.5},
    ):
        watcher.handle(record)
    assert [(r["step"], r.get("dataset")) for r in seen] == [(1, None), (2, None), (2, "alpha")]
    assert watcher.bar.n == 2
    with pytest.raises(SlurmJobError, match="after 3 requeues"):
        watcher.handle(
            {
                "event": "interrupted",
                "step": 3,
                "reason": "warning",
                "action": "give_up",
                "attempt": 3,
                "message": "SLURM job 7 hit its time limit or was preempted again after 3 requeues",
            }
        )
    watcher.close()


def test_memory_is_asked_per_node():
    assert _memory_per_node("64G", 4) == "256G"
    assert _memory_per_node("8000m", 2) == "16000M"
    assert _memory_per_node(None, 4) is None
    with pytest.raises(ValueError, match="mem_per_task"):
        _memory_per_node("lots", 2)


def test_without_sbatch_the_error_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SlurmJobError, match="local-cluster/start.sh"):
        run_slurm(folder=tmp_path, train_config={}, checkpoint_dir=tmp_path)


def test_an_sbatch_that_refuses_the_job_is_one_message_with_its_reason(monkeypatch, tmp_path):
    """sbatch installed but no cluster configured: its reason and what to do, not submitit's traceback."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(
        "#!/bin/sh\necho 'sbatch: fatal: Could not establish a configuration source' >&2\nexit 1\n"
    )
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(SlurmJobError) as refused:
        run_slurm(
            folder=tmp_path / "jobs", train_config=fast_train_config(steps=4), checkpoint_dir=tmp_path / "c",
            model_config={}, episode_index={}, preprocessed_manifest=None,
        )  # fmt: skip
    message = str(refused.value)
    assert (
        "sbatch refused the training job: sbatch: fatal: Could not establish a configuration source"
        in message
    )
    assert "SLURM_CONF" in message and str(tmp_path / "jobs") in message and "\n" not in message


def test_a_mistyped_launcher_option_is_refused_before_submission(monkeypatch, tmp_path):
    """Not pickled into the job to fail on every rank after queueing: named, with the valid options."""
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch: nothing could be submitted anyway
    with pytest.raises(ValueError, match=r"\['gpu_per_node'\].*'gpus_per_node'"):
        run_slurm(
            folder=tmp_path,
            gpu_per_node=4,
            model_config={},
            train_config={},
            episode_index={},
            preprocessed_manifest=None,
            checkpoint_dir=tmp_path,
        )


def test_hpcc_local_is_hpcc_shrunk(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "make_env", PROJECT_ROOT / "slurm/local-cluster/make_env.py"
    )
    make_env = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_env)
    conf = tmp_path / "conf"
    shutil.copytree(PROJECT_ROOT / "conf" / "hpcc", conf / "hpcc")
    env = make_env.compose_env(conf)
    hpcc = yaml.safe_load((conf / "hpcc" / "parameters_train.yml").read_text(encoding="utf-8"))
    local = yaml.safe_load((env / "parameters_train.yml").read_text(encoding="utf-8"))
    assert local["model"]["size"] == "tiny" and local["train"]["launcher"] == "slurm"
    assert local["train"]["launcher_options"]["tasks_per_node"] == 2
    assert local["train"]["launcher_options"]["gpus_per_node"] == 0
    # what the override files leave alone is hpcc's, interpolations included
    assert local["train"]["launcher_options"]["folder"] == hpcc["train"]["launcher_options"]["folder"]
    assert local["train"]["lr"] == hpcc["train"]["lr"]
    assert (
        yaml.safe_load((env / "mlflow.yml").read_text(encoding="utf-8"))["server"]["mlflow_tracking_uri"]
        == "sqlite:///mlflow.db"
    )
    assert sorted(p.name for p in env.iterdir()) == sorted(p.name for p in (conf / "hpcc").iterdir())
    json.dumps(local)  # plain data: no OmegaConf leftovers


class _FakeJob:
    """A submitted job that runs on and on: one metrics record, no result."""

    job_id = "4711"

    def __init__(self, folder: Path) -> None:
        self.paths = types.SimpleNamespace(folder=folder)
        (folder / slurm_launcher.METRICS_FILE).write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")

    def task(self, rank: int) -> types.SimpleNamespace:
        folder = self.paths.folder
        return types.SimpleNamespace(
            paths=types.SimpleNamespace(
                result_pickle=folder / f"4711_{rank}_result.pkl", stderr=folder / f"4711_{rank}_log.err"
            )
        )


@pytest.fixture
def running_job(monkeypatch, tmp_path):
    """run_slurm against a fake submitit and an sbatch on PATH; returns the ids scancel was called with."""
    import submitit

    class Executor:
        def __init__(self, folder: Path) -> None:
            self.folder = folder

        def update_parameters(self, **parameters) -> None:
            self.parameters = parameters

        def submit(self, _call) -> _FakeJob:
            return _FakeJob(self.folder)

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text("#!/bin/sh\n")
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(submitit, "SlurmExecutor", Executor)
    monkeypatch.setattr(slurm_launcher, "job_state", lambda job_id: "RUNNING")
    cancelled: list[str] = []
    monkeypatch.setattr(slurm_launcher, "cancel_job", cancelled.append)
    return cancelled


def _watch(tmp_path: Path, on_metrics, **options) -> None:
    run_slurm(
        folder=tmp_path / "jobs", tasks_per_node=2, train_config=fast_train_config(steps=4),
        checkpoint_dir=tmp_path / "checkpoints", model_config={}, episode_index={},
        preprocessed_manifest=None, on_metrics=on_metrics, poll_s=0.05, **options,
    )  # fmt: skip


def _interrupt_on_first_record(record) -> None:
    if "tags" not in record:
        raise KeyboardInterrupt


def test_an_error_while_watching_cancels_the_job_and_names_it(running_job, tmp_path):
    """Nobody would collect the result of a job left running, and a rerun would train a second one into
    the same checkpoints."""

    def broken(record):
        if "tags" not in record:
            raise RuntimeError("a bug in a metrics callback")

    with pytest.raises(RuntimeError, match="a bug in a metrics callback") as caught:
        _watch(tmp_path, broken)
    assert running_job == ["4711"]
    assert any("SLURM job 4711 was cancelled" in note for note in caught.value.__notes__)


def test_ctrl_c_cancels_the_job_and_fails_the_run_instead_of_ending_it(running_job, tmp_path):
    """A KeyboardInterrupt would skip Kedro's pipeline-error hooks, and MLflow would mark the run FINISHED."""
    with pytest.raises(SlurmJobError, match="Ctrl-C: cancelled SLURM job 4711; its checkpoints stay in"):
        _watch(tmp_path, _interrupt_on_first_record)
    assert running_job == ["4711"]


def test_the_job_folder_exists_before_submission_and_srun_gets_the_cpus(running_job, tmp_path, monkeypatch):
    """A job that starts before its log folder exists fails with no log; srun of Slurm 22.05-23.02 does not
    read SLURM_CPUS_PER_TASK."""
    import submitit

    seen = {}
    original = submitit.SlurmExecutor

    class Recording(original):
        def submit(self, call):
            seen["exists"], seen["srun_args"] = self.folder.is_dir(), self.parameters["srun_args"]
            return super().submit(call)

    monkeypatch.setattr(submitit, "SlurmExecutor", Recording)
    with pytest.raises(SlurmJobError):
        _watch(tmp_path, _interrupt_on_first_record, cpus_per_task=6)
    assert seen == {"exists": True, "srun_args": ["--kill-on-bad-exit=1", "--cpus-per-task=6"]}


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_a_closed_terminal_count_as_ctrl_c(number):
    with catching(number):  # as in a terminal session (a suite run under nohup ignores SIGHUP)
        before = signal.getsignal(number)
        with pytest.raises(KeyboardInterrupt), _Interrupt() as interrupt:
            os.kill(os.getpid(), number)
        assert interrupt.cause == signal.Signals(number).name
        assert signal.getsignal(number) is before  # the previous handler is back


def test_under_nohup_logging_out_does_not_cancel_the_job():
    """nohup ignores SIGHUP so that `kedro run` outlives the terminal: waiting must not undo that."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with catching(signal.SIGTERM), _Interrupt() as interrupt:
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) == interrupt._terminate
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_ranks_meet_at_the_address_rank_0_bound_and_published(tmp_path):
    """Rank 0 binds its store's port in the same call and writes it to the job folder; a port agreed in
    advance (submitit's from the job id) was held by something else on the node twice in the suite."""
    import socket
    import threading
    from datetime import timedelta

    address_file = tmp_path / "rendezvous_7_attempt0.json"
    joined = {}
    # Every store stays open until both ranks have read: rank 0's store is the server, and closing it as
    # soon as rank 0 has read could cut off rank 1's read still in flight (as a training run's never is).
    stores = []

    def join(rank: int) -> None:
        store = slurm_launcher.rendezvous_store(
            rank, 2, "127.0.0.1", address_file, timeout=timedelta(seconds=30)
        )
        stores.append(store)
        store.set(f"rank{rank}", "here")
        joined[rank] = store.get(f"rank{1 - rank}").decode()

    other = threading.Thread(target=join, args=(1,))
    other.start()  # before rank 0: it waits for the address file
    time.sleep(0.5)
    assert not address_file.exists()
    join(0)
    other.join(timeout=30)
    assert joined == {0: "here", 1: "here"}
    published = json.loads(address_file.read_text())
    assert published["host"] == "127.0.0.1" and published["port"] > 0
    assert [p.name for p in tmp_path.iterdir()] == [address_file.name]  # no partial file left

    # A port a user exports (MASTER_PORT) is the one rank 0 binds.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        chosen = probe.getsockname()[1]
    store = slurm_launcher.rendezvous_store(
        0, 1, "127.0.0.1", tmp_path / "rendezvous_8_attempt0.json", port=chosen, timeout=timedelta(seconds=30)
    )
    assert store.port == chosen


def test_a_rank_without_rank_0_names_the_address_file_it_waited_for(tmp_path):
    from datetime import timedelta

    missing = tmp_path / "rendezvous_9_attempt1.json"
    with pytest.raises(TimeoutError, match=r"rank 1: rank 0 did not publish .*rendezvous_9_attempt1.json"):
        slurm_launcher.rendezvous_store(1, 2, "127.0.0.1", missing, timeout=timedelta(seconds=0.5))
