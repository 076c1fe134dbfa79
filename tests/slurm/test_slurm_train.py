"""`kedro run --pipelines=train` through a real SLURM cluster (slurm/local-cluster), as a user runs it.

The env is conf/hpcc composed with slurm/local-cluster/hpcc_local (what `make_env.py` writes for users)
and shrunk once more for the 2-core test machine: CPU, gloo, 2 tasks, the tiny model, a few steps. Each test
picks its own seed, so no run resumes from another's checkpoints.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from processes import interruptible_children
from test_project_run import KEDRO, kedro_run, latest_version, mlflow_runs, project_copy  # noqa: F401
from training_synthetic import build_collection

from iris_pipelines.launch.slurm import TERMINAL_STATES, job_state

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

HERE = Path(__file__).resolve().parent
MAKE_ENV = HERE.parents[1] / "slurm" / "local-cluster" / "make_env.py"
ENV = "slurm_test"
TEST_OVERRIDES = """
train:
  launcher_options: {poll_s: 0.5, time_min: 10}
  warmup_steps: 2
  val_every: 1000
  checkpoint_every: 1000
  log_every: 1
"""


def _make_env():
    spec = importlib.util.spec_from_file_location("make_env", MAKE_ENV)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def slurm_project(project_copy: Path, slurm_cluster, tmp_path_factory) -> Path:  # noqa: F811
    """The project copy with the test env and a small preprocessed collection saved as catalog versions."""
    from kedro.io.core import Version
    from kedro_datasets.json import JSONDataset
    from kedro_datasets.pandas import ParquetDataset

    make_env = _make_env()
    conf = project_copy / "conf"
    make_env.compose_env(conf)  # conf/hpcc_local, as documented for users
    overrides = tmp_path_factory.mktemp("overrides")
    (overrides / "parameters_train.yml").write_text(TEST_OVERRIDES)
    # The spacing of build_collection's volumes, which train records in the bundle and checks.
    (overrides / "parameters_preprocess.yml").write_text("preprocess:\n  target_spacing: [3.0, 3.0, 3.0]\n")
    make_env.compose_env(conf, name=ENV, source="hpcc_local", overrides=overrides)

    manifest, index = build_collection(tmp_path_factory.mktemp("volumes"))
    inputs = project_copy / "data" / "05_model_input"
    JSONDataset(filepath=str(inputs / "episode_index.json"), version=Version(None, None)).save(index)
    ParquetDataset(filepath=str(inputs / "preprocessed_manifest.parquet"), version=Version(None, None)).save(
        manifest
    )
    return project_copy


def _params(**values) -> str:
    return "--params=" + ",".join(f"{key}={value}" for key, value in values.items())


def _jobs_dir(root: Path) -> Path:
    return root / "data" / "06_models" / "slurm_jobs"


def _new_job(root: Path, before: set[str], process: subprocess.Popen, timeout: float = 120) -> Path:
    """The job folder the running `kedro run` submitted (named ``<time>-<random>``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = _jobs_dir(root)
        new = [p for p in jobs.glob("*") if p.is_dir() and p.name not in before]
        if new:
            return new[0]
        assert process.poll() is None, f"kedro run ended before submitting:\n{_output(process)}"
        time.sleep(0.2)
    raise AssertionError("no SLURM job was submitted")


def _records(job: Path) -> list[dict]:
    path = job / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.endswith("}")]


def _wait_for(job: Path, predicate, process: subprocess.Popen, timeout: float = 180) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = _records(job)
        if predicate(records):
            return records
        assert process.poll() is None, f"kedro run ended early:\n{_output(process)}"
        time.sleep(0.1)
    raise AssertionError(f"timed out; records so far: {_records(job)}")


def _without_mlflow(environ) -> dict[str, str]:
    return {key: value for key, value in environ.items() if not key.startswith("MLFLOW_")}


def _start_kedro(root: Path, *args: str, **env: str) -> subprocess.Popen:
    with interruptible_children():  # the Ctrl-C test's SIGINT must reach it
        return subprocess.Popen(
            [KEDRO, "run", *args],
            cwd=root,
            # COLUMNS: rich would wrap the log lines the tests look for. No MLFLOW_*: the project's own
            # conf decides where runs and models go (as in kedro_run), not a caller's registry URI.
            env={**_without_mlflow(os.environ), "KEDRO_DISABLE_TELEMETRY": "1", "COLUMNS": "300", **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            encoding="utf-8",
            errors="replace",
        )


def _output(process: subprocess.Popen, timeout: float = 600) -> str:
    out, _ = process.communicate(timeout=timeout)
    return out


def _job_id(job: Path, timeout: float = 60) -> str:
    """From the submission script submitit names after the job (the folder exists before sbatch runs)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        scripts = list(job.glob("*_submission.sh"))
        if scripts:
            return scripts[0].name.split("_")[0]
        time.sleep(0.2)
    raise AssertionError(f"no submission script in {job}")


def _scontrol(job_id: str) -> str:
    return subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, check=True
    ).stdout


def _settled_state(job_id: str, timeout_s: float = 60) -> str:
    """The job's state once SLURM has finished with it (COMPLETING is only SLURM cleaning up)."""
    deadline = time.monotonic() + timeout_s
    state = job_state(job_id)
    while state.split()[0] not in TERMINAL_STATES and time.monotonic() < deadline:
        time.sleep(0.5)
        state = job_state(job_id)
    return state.split()[0]


def _run_of_job(root: Path, job_id: str):
    runs = [run for run in mlflow_runs(root) if run.data.tags.get("slurm_job_id") == job_id]
    assert len(runs) == 1, f"expected one MLflow run for SLURM job {job_id}, found {len(runs)}"
    return runs[0]


def _model_version(root: Path, run_id: str):
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    versions = client.search_model_versions(f"run_id = '{run_id}'")
    assert len(versions) == 1, versions
    return client, versions[0]


def test_kedro_run_trains_through_sbatch_srun(slurm_project: Path):
    steps = 6
    result = kedro_run(
        slurm_project, "--pipelines=train", f"--env={ENV}", _params(**{"train.steps": steps, "train.seed": 1})
    )
    run = mlflow_runs(slurm_project)[-1]
    job_id = run.data.tags["slurm_job_id"]
    assert re.fullmatch(r"\d+", job_id), run.data.tags
    assert f"Submitted SLURM job {job_id}" in result.stdout + result.stderr
    assert _settled_state(job_id) == "COMPLETED"  # `kedro run` returns on the result files, maybe before
    assert run.info.status == "FINISHED"
    assert run.data.tags["world_size"] == "2"
    assert run.data.tags["kedro_env"] == ENV
    # The ranks met at the port rank 0 bound and published in the job folder.
    (address_file,) = Path(run.data.tags["slurm_job_folder"]).glob(f"rendezvous_{job_id}_attempt0.json")
    (started,) = [r for r in _records(Path(run.data.tags["slurm_job_folder"])) if r.get("event") == "started"]
    assert started["master"].endswith(f":{json.loads(address_file.read_text())['port']}")

    bundle = json.loads(
        (latest_version(slurm_project / "data/06_models/iris_model") / "config.json").read_text()
    )
    metadata = bundle["metadata"]
    assert metadata["launcher"] == "slurm" and metadata["world_size"] == 2
    assert metadata["final_step"] == steps
    checksums = metadata["weights_checksum"]
    assert len(checksums) == 2 and checksums[0] == checksums[1], checksums  # DDP kept the ranks equal

    client, version = _model_version(slurm_project, run.info.run_id)
    tags = version.tags
    assert tags["world_size"] == "2" and tags["final_step"] == str(steps)
    assert len(tags["git_commit"]) == 40 and len(tags["lockfile_sha256"]) == 64
    assert tags["kedro_env"] == ENV
    assert tags["input_version.episode_index"] != "unversioned"
    assert tags["input_version.preprocessed_manifest"] != "unversioned"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, steps + 1))  # rank 0's metrics, via the file


def test_preempted_job_checkpoints_requeues_and_resumes(slurm_project: Path):
    steps, seed = 20, 2
    before = {p.name for p in _jobs_dir(slurm_project).glob("*")}
    process = _start_kedro(
        slurm_project,
        "--pipelines=train",
        f"--env={ENV}",
        _params(**{"train.steps": steps, "train.seed": seed}),
    )
    job = _new_job(slurm_project, before, process)
    _wait_for(job, lambda records: any(r.get("step", 0) >= 3 and "loss" in r for r in records), process)
    # What SLURM sends signal_delay_s before the time limit (submitit's --signal=USR2@…), to every task.
    subprocess.run(["scancel", "--signal=USR2", _job_id(job)], check=True)
    output = _output(process)
    assert process.returncode == 0, output

    events = [r for r in _records(job) if "event" in r]
    interrupted = [e for e in events if e["event"] == "interrupted"]
    assert len(interrupted) == 1 and interrupted[0]["action"] == "requeue", events
    assert 3 <= interrupted[0]["step"] < steps
    assert [e["attempt"] for e in events if e["event"] == "started"] == [0, 1]
    assert _settled_state(_job_id(job)) == "COMPLETED"
    assert "Restarts=1" in _scontrol(_job_id(job)), _scontrol(_job_id(job))
    assert f"requeued itself after a checkpoint at step {interrupted[0]['step']}" in output

    run = _run_of_job(slurm_project, _job_id(job))  # the waiting process kept its one MLflow run
    assert run.info.status == "FINISHED"
    client, version = _model_version(slurm_project, run.info.run_id)
    assert version.tags["final_step"] == str(steps)
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, steps + 1))  # every step once, none lost


def test_kedro_run_inside_an_allocation_submits_a_job_that_runs(slurm_project: Path):
    """`kedro run` in salloc or an sbatch'd driver: the allocation's variables stay out of the job. Passed
    on, an allocation's SLURM_MEM_PER_CPU beside the job's own --mem made srun refuse every rank."""
    allocation = {"SLURM_JOB_ID": "424242", "SLURM_JOBID": "424242", "SLURM_NTASKS": "1",
                  "SLURM_CPUS_PER_TASK": "1", "SLURM_MEM_PER_CPU": "100"}  # fmt: skip
    process = _start_kedro(
        slurm_project,
        "--pipelines=train",
        f"--env={ENV}",
        _params(**{"train.steps": 2, "train.seed": 5, "train.launcher_options.mem_per_task": "64M"}),
        **allocation,
    )
    output = _output(process)
    assert process.returncode == 0, output[-3000:]
    assert "Submitting from inside SLURM job 424242" in output
    job_id = re.search(r"Submitted SLURM job (\d+)", output).group(1)
    assert _settled_state(job_id) == "COMPLETED"
    assert "MinMemoryNode=128M" in _scontrol(job_id), _scontrol(job_id)  # the job's --mem: 2 ranks x 64M


def test_a_failing_rank_names_the_job_and_the_cause(slurm_project: Path):
    before = {p.name for p in _jobs_dir(slurm_project).glob("*")}
    process = _start_kedro(
        slurm_project,
        "--pipelines=train",
        f"--env={ENV}",
        _params(**{"train.steps": 4, "train.seed": 3}),
        PYTHONPATH=str(HERE / "fault_injection"),
        IRIS_TEST_FAIL_RANK="1",
    )
    job = _new_job(slurm_project, before, process)
    output = _output(process)
    assert process.returncode != 0
    assert (
        f"SLURM job {_job_id(job)} failed: rank 1 of 2 raised RuntimeError: injected failure on rank 1"
        in output
    ), output[-3000:]
    assert "---- traceback of rank 1 ----" in output
    assert _settled_state(_job_id(job)) in {"FAILED", "CANCELLED"}


def test_ctrl_c_cancels_the_job(slurm_project: Path):
    before = {p.name for p in _jobs_dir(slurm_project).glob("*")}
    process = _start_kedro(
        slurm_project, "--pipelines=train", f"--env={ENV}", _params(**{"train.steps": 500, "train.seed": 4})
    )
    job = _new_job(slurm_project, before, process)
    _wait_for(job, lambda records: any(r.get("event") == "started" for r in records), process)
    process.send_signal(signal.SIGINT)
    output = _output(process, timeout=120)
    assert process.returncode != 0
    assert f"Ctrl-C: cancelled SLURM job {_job_id(job)}" in output, output[-3000:]
    assert _settled_state(_job_id(job)) == "CANCELLED"
