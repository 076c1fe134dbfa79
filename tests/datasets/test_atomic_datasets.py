"""The catalog's file datasets: a save that fails half-way leaves the previous state loadable."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pandas as pd
import plotly.graph_objects as go
import pytest
import yaml
from kedro.io import DatasetError
from kedro.io.core import Version

from iris_pipelines.datasets import (
    AtomicCSVDataset,
    AtomicHTMLDataset,
    AtomicJSONDataset,
    AtomicMatplotlibDataset,
    AtomicParquetDataset,
    AtomicTextDataset,
)

PROJECT = Path(__file__).resolve().parents[2]


class Unprintable:
    """A cell that fails while the CSV is written, as a bad object column would."""

    def __str__(self) -> str:
        raise RuntimeError("cannot format this cell")


def _figure() -> Any:
    figure, axes = plt.subplots()
    axes.plot([0, 1], [1, 0])
    return figure


# (dataset class, extra arguments, good data, data whose save fails after the file is opened, reader)
CASES = {
    "csv": (
        AtomicCSVDataset,
        {},
        pd.DataFrame({"dice": [0.5, 0.75]}),
        pd.DataFrame({"dice": [0.5, Unprintable()]}),
        lambda path: pd.read_csv(path)["dice"].tolist(),
    ),
    "parquet": (
        AtomicParquetDataset,
        {},
        pd.DataFrame({"dice": [0.5, 0.75]}),
        pd.DataFrame({"dice": [0.5, "not a number"]}),  # pyarrow refuses the mixed column
        lambda path: pd.read_parquet(path)["dice"].tolist(),
    ),
    "json": (
        AtomicJSONDataset,
        {},
        {"episodes": [1, 2]},
        {"episodes": [1, 2], "sampler": object()},  # json.dump has written the first key when it fails
        lambda path: json.loads(Path(path).read_text()),
    ),
    "text": (AtomicTextDataset, {}, "# report\n", b"bytes, not text", lambda path: Path(path).read_text()),
    "html": (
        AtomicHTMLDataset,
        {},
        go.Figure(go.Scatter(x=[0, 1], y=[1, 0])),
        "not a figure",
        lambda path: "plotly" in Path(path).read_text(),
    ),
    "png folder": (
        AtomicMatplotlibDataset,
        {},
        None,  # built in the test: figures are closed by each save
        None,
        lambda path: sorted(p.name for p in Path(path).iterdir()),
    ),
}


def _data(name: str, good: bool) -> Any:
    _, _, good_data, bad_data, _ = CASES[name]
    if name == "png folder":  # the first figure is written before the second fails
        return [_figure(), _figure()] if good else [_figure(), "not a figure"]
    return good_data if good else bad_data


def _dataset(name: str, path: Path, versioned: bool) -> Any:
    cls, kwargs, *_ = CASES[name]
    return cls(filepath=str(path), version=Version(None, None) if versioned else None, **kwargs)


def _leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.name.startswith("."))


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("versioned", [True, False], ids=["versioned", "plain"])
def test_failed_save_keeps_the_previous_state(tmp_path, name, versioned):
    path = tmp_path / "out" / f"table.{name.split()[-1]}"
    read = CASES[name][4]
    _dataset(name, path, versioned).save(_data(name, good=True))
    saved = path / next(path.iterdir()).name / path.name if versioned else path
    before = read(saved)

    with pytest.raises(DatasetError):
        _dataset(name, path, versioned).save(_data(name, good=False))

    fresh = _dataset(name, path, versioned)
    assert (fresh._get_load_path() if versioned else path) == (saved if versioned else path)
    assert read(saved) == before
    assert _leftovers(tmp_path) == []  # no scratch file, no half-written folder
    if versioned:
        assert len(list(path.iterdir())) == 1, "the failed save's empty version folder is removed too"


def test_interrupted_save_leaves_no_scratch_and_the_old_file(tmp_path):
    path = tmp_path / "summary.csv"
    AtomicCSVDataset(filepath=str(path)).save(pd.DataFrame({"dice": [0.5]}))

    class Interrupting:
        def __str__(self) -> str:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        AtomicCSVDataset(filepath=str(path)).save(pd.DataFrame({"dice": [Interrupting()]}))
    assert pd.read_csv(path)["dice"].tolist() == [0.5]
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("name", ["csv", "json", "text"])
def test_saves_what_the_stock_dataset_saves_with_the_umask_mode(tmp_path, name):
    path = tmp_path / f"out.{name}"
    dataset = _dataset(name, path, versioned=False)
    dataset.save(_data(name, good=True))
    reloaded, expected = dataset.load(), _data(name, good=True)
    assert reloaded.equals(expected) if name == "csv" else reloaded == expected
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not a scratch file's private 0600
    dataset.save(_data(name, good=True))  # replacing a file keeps working
    assert _leftovers(tmp_path) == []


def test_a_figure_folder_is_replaced_whole(tmp_path):
    path = tmp_path / "plots"
    AtomicMatplotlibDataset(filepath=str(path)).save({"a.png": _figure(), "b.png": _figure()})
    AtomicMatplotlibDataset(filepath=str(path)).save({"c.png": _figure()})
    assert sorted(p.name for p in path.iterdir()) == ["c.png"]
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("cls", [AtomicTextDataset, AtomicCSVDataset])
def test_append_mode_appends_and_exclusive_mode_refuses_an_existing_file(tmp_path, cls):
    """Each save opened a new scratch file, so append mode kept only the last save and exclusive mode
    overwrote the file it exists to protect."""
    first, second = ("line 1\n", "line 2\n") if cls is AtomicTextDataset else (
        pd.DataFrame({"v": [1]}), pd.DataFrame({"v": [2]})
    )  # fmt: skip
    save_args = {} if cls is AtomicTextDataset else {"save_args": {"index": False, "header": False}}
    appended = tmp_path / "appended"
    dataset = cls(filepath=str(appended), fs_args={"open_args_save": {"mode": "a"}}, **save_args)
    dataset.save(first)
    dataset.save(second)
    assert appended.read_text() == ("line 1\nline 2\n" if cls is AtomicTextDataset else "1\n2\n")

    exclusive = tmp_path / "exclusive"
    dataset = cls(filepath=str(exclusive), fs_args={"open_args_save": {"mode": "x"}}, **save_args)
    dataset.save(first)
    kept = exclusive.read_text()
    with pytest.raises(DatasetError, match=r"exists, and open mode 'x' \(exclusive\) forbids overwriting"):
        dataset.save(second)
    assert exclusive.read_text() == kept and _leftovers(tmp_path) == []


def test_a_save_through_a_symlink_updates_the_file_it_names(tmp_path):
    """The rename replaced the link by a plain file: whoever else reads the shared file kept old data."""
    shared, link = tmp_path / "shared.json", tmp_path / "link.json"
    shared.write_text("{}")
    link.symlink_to(shared)
    AtomicJSONDataset(filepath=str(link)).save({"v": 1})
    assert link.is_symlink() and json.loads(shared.read_text()) == {"v": 1}


def test_a_directory_target_and_an_empty_figure_list_are_named(tmp_path):
    """A folder at a file's path failed naming the hidden scratch file; an empty list of figures failed
    with Kedro's "a file with the same name already exists"."""
    (tmp_path / "metrics.parquet").mkdir()
    with pytest.raises(DatasetError, match=r"metrics.parquet is a directory; AtomicParquetDataset saves a"):
        AtomicParquetDataset(filepath=str(tmp_path / "metrics.parquet")).save(pd.DataFrame({"v": [1]}))
    plots = AtomicMatplotlibDataset(filepath=str(tmp_path / "plots"), version=Version(None, None))
    with pytest.raises(DatasetError, match=r"nothing was written \(an empty list or dict of figures\?\)"):
        plots.save([])
    assert _leftovers(tmp_path) == []


def test_remote_paths_are_written_directly():
    """An object store publishes an object whole; a local rename of a remote path would fail."""
    dataset = AtomicJSONDataset(filepath="memory:///atomic-test/index.json", version=Version(None, None))
    dataset.save({"episodes": 3})
    assert dataset.load() == {"episodes": 3}


def test_every_file_dataset_in_the_base_catalog_saves_atomically():
    stock = {"pandas.", "json.", "text.", "matplotlib.", "plotly."}
    for catalog in sorted((PROJECT / "conf" / "base").glob("catalog*.yml")):
        for name, entry in yaml.safe_load(catalog.read_text()).items():
            assert not any(entry["type"].startswith(prefix) for prefix in stock), (
                f"{catalog.name}: {name} uses the stock {entry['type']}, which leaves a truncated file "
                "when a save fails; use its iris_pipelines.datasets.Atomic* counterpart"
            )


@pytest.mark.parametrize(
    ("cls", "good", "error"),
    [
        (AtomicJSONDataset, {"episodes": [1, 2]}, json.JSONDecodeError),
        (AtomicParquetDataset, pd.DataFrame({"dice": [0.5]}), Exception),  # pyarrow's ArrowInvalid
    ],
    ids=["json", "parquet"],
)
def test_a_damaged_latest_version_is_named_when_it_fails_to_load(tmp_path, cls, good, error):
    """Kedro's error named the dataset's folder and a new save version, not the version file that
    failed, so a file truncated outside Kedro could not be told from the intact versions."""
    path = tmp_path / f"index.{'json' if cls is AtomicJSONDataset else 'parquet'}"
    older, latest = "2026-01-01T00.00.00.000Z", "2026-01-02T00.00.00.000Z"
    for version in (older, latest):
        cls(filepath=str(path), version=Version(None, version)).save(good)
    damaged = path / latest / path.name
    damaged.write_bytes(damaged.read_bytes()[:7])

    with pytest.raises(DatasetError) as failure:
        cls(filepath=str(path), version=Version(None, None)).load()
    message = str(failure.value)
    assert message.startswith(f"Cannot load {damaged} ({cls.__name__}): ")
    assert "--load-versions" in message
    assert isinstance(failure.value.__cause__, error)

    intact = cls(filepath=str(path), version=Version(older, None)).load()
    assert intact == good if isinstance(good, dict) else intact.equals(good)
    with pytest.raises(DatasetError, match=r"Cannot load .*missing\.json \(AtomicJSONDataset\): FileNotF"):
        AtomicJSONDataset(filepath=str(tmp_path / "missing.json")).load()
