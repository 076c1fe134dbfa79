"""The `iris` console script as a user calls it."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from iris_pipelines.cli import main
from iris_pipelines.phantoms import default_specs, generate_collection


def abdomen_ct(root: Path) -> Path:
    spec = next(spec for spec in default_specs() if spec.name == "AbdomenCT")
    (source,) = generate_collection(root, cases_per_dataset=2, size_scale=0.3, specs=[spec])
    return Path(source["path"])


def test_validate_accepts_a_clean_msd_dataset(tmp_path: Path):
    dataset = abdomen_ct(tmp_path)
    result = CliRunner().invoke(main, ["validate", str(dataset), "--layout", "msd"])
    assert result.exit_code == 0, result.output
    assert "2 accepted, 0 rejected" in result.output


def test_validate_names_the_broken_file_and_exits_1(tmp_path: Path):
    dataset = abdomen_ct(tmp_path)
    broken = sorted((dataset / "labelsTr").iterdir())[0]
    broken.write_bytes(b"")
    result = CliRunner().invoke(main, ["validate", str(dataset), "--layout", "msd"])
    assert result.exit_code == 1
    assert "1 accepted, 1 rejected" in result.output
    assert "unreadable" in result.output and "0 bytes" in result.output


def test_validate_of_a_csv_manifest_asks_for_the_modality_option(tmp_path: Path):
    """ingest's message speaks of the YAML config's `modality: CT`; the CLI user needs the option."""
    (tmp_path / "manifest.csv").write_text("case_id,image,label\n")
    result = CliRunner().invoke(main, ["validate", str(tmp_path), "--layout", "csv"])
    assert result.exit_code == 2, result.output
    assert "--modality CT|MR|PET" in result.output and "modality: CT" not in result.output


def test_python_dash_m_outside_a_kedro_project_says_where_to_run_it(tmp_path: Path, monkeypatch, capsys):
    """It once died ~270 lines later in an MLflow "filesystem tracking backend" error."""
    from iris_pipelines.__main__ import main as run_project

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exited:
        run_project([])
    assert exited.value.code == 2
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and "from the project root" in message and str(tmp_path) in message


def test_phantoms_writes_the_collection(tmp_path: Path):
    result = CliRunner().invoke(
        main, ["phantoms", str(tmp_path / "p"), "--cases-per-dataset", "1", "--size-scale", "0.25"]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "p" / "phantoms.json").exists()
    assert "PelvisCT" in result.output


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--cases-per-dataset", "0"], "cases_per_dataset must be ≥ 1"),
        (["--size-scale", "-1"], "must be a finite number above 0, got -1.0"),
        # NaN passes every `<=` test and wrote 8³ volumes with NaN origins; inf died in Geometry.
        (["--size-scale", "nan"], "must be a finite number above 0, got nan"),
        (["--size-scale", "inf"], "must be a finite number above 0, got inf"),
    ],
)
def test_phantoms_rejects_bad_options_in_one_line(tmp_path: Path, options: list[str], expected: str):
    result = CliRunner().invoke(main, ["phantoms", str(tmp_path / "p"), *options])
    assert result.exit_code == 2, result.output
    assert expected in result.output and "Traceback" not in result.output
    assert not (tmp_path / "p").exists(), "refused before anything is written"


def test_phantoms_defaults_write_make_runs_collection():
    """A bare `iris phantoms DIR` is the collection `make run` ingests, not another seed and size."""
    import yaml

    conf = yaml.safe_load((Path(__file__).parents[1] / "conf/base/parameters_ingest.yml").read_text())
    defaults = {param.name: param.default for param in main.commands["phantoms"].params}
    assert defaults["seed"] == conf["phantoms"]["seed"]
    assert defaults["cases_per_dataset"] == conf["phantoms"]["cases_per_dataset"]
    assert defaults["size_scale"] == conf["phantoms"]["size_scale"]


def test_phantoms_refuses_a_folder_it_did_not_write(tmp_path: Path):
    mine = tmp_path / "p" / "Task07_Pancreas" / "dataset.json"
    mine.parent.mkdir(parents=True)
    mine.write_text("{}")
    result = CliRunner().invoke(main, ["phantoms", str(tmp_path / "p"), "--size-scale", "0.2"])
    assert result.exit_code == 2, result.output
    assert "Task07_Pancreas" in result.output and "Traceback" not in result.output
    assert mine.read_text() == "{}"


@pytest.mark.parametrize("root", ["afile", "afile/sub"], ids=["ROOT is a file", "under a file"])
def test_phantoms_root_that_cannot_be_a_folder_is_a_one_line_error(tmp_path: Path, root: str):
    (tmp_path / "afile").write_text("")
    result = CliRunner().invoke(main, ["phantoms", str(tmp_path / root), "--cases-per-dataset", "1"])
    assert result.exit_code == 2, result.output
    assert "afile" in result.output and "Traceback" not in result.output


def test_loading_the_config_and_the_pyfunc_prints_no_third_party_warnings() -> None:
    """Every `kedro run` and `iris` command printed an MLflow type-hint warning and OmegaConf deprecations
    (from Kedro's own calls): noise nobody could act on, burying the warnings that matter."""
    import subprocess
    import sys

    conf = str(Path(__file__).parents[1] / "conf")
    script = (
        "from kedro.config import OmegaConfigLoader\n"
        "import iris_pipelines.inference.pyfunc_model\n"
        "from iris_pipelines.settings import CONFIG_LOADER_ARGS\n"
        f"OmegaConfigLoader({conf!r}, **CONFIG_LOADER_ARGS)['parameters']\n"
    )
    result = subprocess.run(
        [sys.executable, "-W", "always", "-c", script], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "Add type hints" not in result.stderr and "register_new_resolver" not in result.stderr, (
        result.stderr
    )
