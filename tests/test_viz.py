"""kedro-viz: the static lineage site (`make viz`) shows every pipeline and its versioned datasets.

The expectations come from the project itself (pipeline registry + catalog entries with
``versioned: true``). A build of a temporary copy of the project is checked twice: its API files, and the
page as headless Chromium renders it (the single-page app fetches ``api/*`` over HTTP, so the build is
served by ``http.server`` on a free port).
"""

from __future__ import annotations

import functools
import html.parser
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from kedro.io import DataCatalog
from kedro.io.core import DatasetError
from project_copy import copy_project

from iris_pipelines.datasets import IrisModelBundleDataset
from iris_pipelines.pipeline_registry import PIPELINE_ORDER

PROJECT_ROOT = Path(__file__).resolve().parents[1]
KEDRO = str(Path(sys.executable).with_name("kedro"))
# data/<NN_folder> -> the kedro-viz layer of a dataset stored there.
LAYERS = {
    "01_raw": "raw",
    "02_intermediate": "intermediate",
    "03_primary": "primary",
    "04_feature": "feature",
    "05_model_input": "model_input",
    "06_models": "models",
    "07_model_output": "model_output",
    "08_reporting": "reporting",
}
SEED_VERSION = "2026-01-01T00.00.00.000Z"
SEED_ROWS = 25
DEFAULT_PREVIEW_ROWS = 5  # kedro-datasets' pandas preview(nrows=5)


# ---- the project's own view: registry and catalog ---------------------------------------------------
@pytest.fixture(scope="module")
def registry() -> dict[str, set[str]]:
    """Registered pipeline name -> the datasets it reads or writes (parameters left out)."""
    from kedro.framework.project import pipelines
    from kedro.framework.startup import bootstrap_project

    bootstrap_project(PROJECT_ROOT)
    return {
        name: {d for d in pipeline.datasets() if d != "parameters" and not d.startswith("params:")}
        for name, pipeline in pipelines.items()
        if name != "__default__"
    }


def catalog_config(project_root: Path) -> dict[str, dict[str, Any]]:
    """The resolved base+local catalog, as `kedro run` / `kedro viz` read it (dataset factories left out)."""
    from kedro.framework.project import settings
    from kedro.framework.startup import bootstrap_project

    bootstrap_project(PROJECT_ROOT)
    loader = settings.CONFIG_LOADER_CLASS(
        conf_source=str(project_root / settings.CONF_SOURCE), **settings.CONFIG_LOADER_ARGS
    )
    return {name: entry for name, entry in loader["catalog"].items() if "{" not in name}


@pytest.fixture(scope="module")
def catalog() -> dict[str, dict[str, Any]]:
    return catalog_config(PROJECT_ROOT)


@pytest.fixture(scope="module")
def versioned(catalog) -> set[str]:
    return {name for name, entry in catalog.items() if entry.get("versioned")}


def viz_metadata(entry: dict[str, Any]) -> dict[str, Any]:
    return (entry.get("metadata") or {}).get("kedro-viz") or {}


def test_all_seven_pipelines_are_registered(registry):
    assert set(PIPELINE_ORDER) <= set(registry), (
        f"pipelines missing from the registry: {sorted(set(PIPELINE_ORDER) - set(registry))}"
    )


def test_every_versioned_dataset_belongs_to_a_pipeline(registry, versioned):
    used = set().union(*registry.values())
    assert versioned, "no catalog entry is versioned"
    assert versioned <= used, f"versioned datasets no pipeline uses: {sorted(versioned - used)}"


def test_every_catalog_entry_has_the_layer_of_its_data_folder(catalog):
    for name, entry in catalog.items():
        layer = viz_metadata(entry).get("layer")
        folder = next((part for part in Path(str(entry.get("filepath", ""))).parts if part in LAYERS), None)
        assert layer in LAYERS.values(), f"{name}: kedro-viz layer {layer!r} is not one of the data layers"
        if folder is not None:
            assert layer == LAYERS[folder], f"{name}: stored in data/{folder} but shown in layer {layer!r}"


def test_model_bundle_preview_is_its_config_without_loading_weights(tmp_path):
    config = {
        "iris_model": {
            "type": "iris_pipelines.datasets.IrisModelBundleDataset",
            "filepath": str(tmp_path / "iris_model"),
            "versioned": True,
        }
    }
    bundle_dir = tmp_path / "iris_model" / SEED_VERSION / "iris_model"
    bundle_dir.mkdir(parents=True)
    document = {"format": "iris-bundle", "model_config": {"channels": 8}, "class_ids": {"liver": 1}}
    (bundle_dir / "config.json").write_text(json.dumps(document))  # no weights: preview must not read them
    dataset = DataCatalog.from_config(config).get("iris_model")
    # kedro-viz picks the widget from the return annotation's name (a string under postponed annotations).
    annotation = inspect.signature(dataset.preview).return_annotation
    assert getattr(annotation, "__name__", str(annotation)) == "JSONPreview"
    assert json.loads(dataset.preview()) == document

    (bundle_dir / "config.json").write_text("{not json")
    with pytest.raises(DatasetError, match="cannot read config.json"):
        dataset.preview()
    with pytest.raises(DatasetError):
        IrisModelBundleDataset(filepath=str(tmp_path / "absent")).preview()


# ---- a real build of a project copy -----------------------------------------------------------------
def seed_latest_versions(root: Path, catalog: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Write a small version of every table/JSON/model dataset; returns name -> expected preview type.

    Parquet tables whose preview is off get an array-valued column, as the manifests' geometry vectors
    and the task embeddings are read back: kedro-viz 12.5 aborts the whole `build --include-previews`
    on such a cell, so the build must skip them; tables with a preview get scalar columns.
    """
    expected = {}
    table = pd.DataFrame({"case_id": [f"case_{i:03d}" for i in range(SEED_ROWS)], "dice": 0.5})
    for name, entry in catalog.items():
        dataset_type = entry["type"].rsplit(".", 1)[-1].removeprefix("Atomic")  # the stock class it saves for
        if "filepath" not in entry:
            continue
        assert not Path(entry["filepath"]).is_absolute(), f"{name}: base catalog paths are project-relative"
        target = root / entry["filepath"]
        if entry.get("versioned"):
            target = target / SEED_VERSION / target.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if dataset_type == "ParquetDataset":
            if (entry.get("metadata") or {}).get("kedro-viz", {}).get("preview") is False:
                table.assign(spacing=[[1.0, 1.0, 1.5]] * SEED_ROWS).to_parquet(target)
            else:
                table.to_parquet(target)
            expected[name] = "TablePreview"
        elif dataset_type == "CSVDataset":
            table.to_csv(target, index=False)
            expected[name] = "TablePreview"
        elif dataset_type == "JSONDataset":
            target.write_text(json.dumps({"seeded": name}))
            expected[name] = "JSONPreview"
        elif dataset_type == "IrisModelBundleDataset":
            target.mkdir()
            (target / "config.json").write_text(json.dumps({"seeded": name}))
            expected[name] = "JSONPreview"
    return expected


@pytest.fixture(scope="module")
def viz_build(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """`kedro viz build --include-previews` (what `make viz` runs) in a copy with seeded data."""
    root = tmp_path_factory.mktemp("viz_project")
    copy_project(root, ("conf", "src", "pyproject.toml", ".telemetry"))
    seeded = seed_latest_versions(root, catalog_config(root))
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "1"}
    result = subprocess.run(
        [KEDRO, "viz", "build", "--include-previews"],
        cwd=root,
        env=env,
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        timeout=300,
        check=False,
    )
    output = result.stdout[-4000:] + result.stderr[-4000:]
    # kedro-viz 12.5 exits 0 even when the build fails; only the success line tells.
    assert result.returncode == 0 and "Success" in result.stdout + result.stderr, output
    return root / "build", seeded


def read_api(build: Path, name: str) -> dict[str, Any]:
    return json.loads((build / "api" / name).read_text())


def test_build_api_has_every_pipeline_and_its_versioned_datasets(viz_build, registry, versioned, catalog):
    build, _ = viz_build
    main = read_api(build, "main")
    assert {p["id"] for p in main["pipelines"]} == set(registry) | {"__default__"}
    assert main["selected_pipeline"] == "__default__"
    for name, datasets in registry.items():
        shown = {n["name"] for n in read_api(build, f"pipelines/{name}")["nodes"] if n["type"] == "data"}
        assert datasets & versioned <= shown, f"{name}: versioned datasets not shown: {datasets - shown}"
    data_nodes = {n["name"]: n for n in main["nodes"] if n["type"] == "data"}
    for name in versioned:
        assert data_nodes[name]["layer"] == viz_metadata(catalog[name])["layer"], name
    # Layers are drawn in pipeline order: raw first, reporting last.
    order = list(LAYERS.values())
    assert main["layers"] == sorted(main["layers"], key=order.index)


def test_build_has_previews_of_the_seeded_data(viz_build, catalog):
    build, seeded = viz_build
    ids = {n["name"]: n["id"] for n in read_api(build, "main")["nodes"] if n["type"] == "data"}
    checked = 0
    for name, preview_type in seeded.items():
        meta = viz_metadata(catalog[name])
        if name not in ids or meta.get("preview") is False:
            continue
        node = read_api(build, f"nodes/{ids[name]}")
        assert node["preview_type"] == preview_type, name
        assert node["preview"] is not None, f"{name}: no preview in the build"
        if preview_type == "TablePreview":
            nrows = (meta.get("preview_args") or {}).get("nrows", DEFAULT_PREVIEW_ROWS)
            assert len(node["preview"]["data"]) == min(nrows, SEED_ROWS), name
        else:
            assert json.loads(node["preview"]) == {"seeded": name}
        checked += 1
    assert checked >= 3


def test_build_carries_no_telemetry(viz_build):
    build, _ = viz_build
    index = (build / "index.html").read_text()
    assert "heap" not in index.lower()


# ---- the page as a browser renders it ---------------------------------------------------------------
def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    message = "headless Chromium is needed to render the kedro-viz build (apt-get install chromium)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{message}; CI must have it")
    pytest.skip(message)


@pytest.fixture(scope="module")
def served(viz_build):
    """The build behind a local HTTP server: the app fetches api/* files, which file:// would block."""
    handler = functools.partial(QuietHandler, directory=str(viz_build[0]))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass


class RenderedPage(html.parser.HTMLParser):
    """Pipeline selector options and the flowchart's drawn nodes: full name -> visible label, by type."""

    def __init__(self) -> None:
        super().__init__()
        self.selector_options: list[str] = []
        self.nodes: dict[str, dict[str, str]] = {"data": {}, "task": {}}
        self._selector_depth = 0  # > 0 inside the pipeline selector's <div>
        self._node: tuple[str, str] | None = None  # (type, full name) of the <g> being read
        self._in_label = False

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        classes = (attributes.get("class") or "").split()
        if self._selector_depth and tag == "div":
            self._selector_depth += 1
        elif attributes.get("data-test") == "kedro-pipeline-selector":
            self._selector_depth = 1
        if self._selector_depth and "menu-option__content" in classes:
            self.selector_options.append(attributes.get("title") or "")
        if tag == "g" and attributes.get("data-node-type") in self.nodes:
            self._node = (attributes["data-node-type"], attributes.get("data-node-fullname") or "")
            self.nodes[self._node[0]][self._node[1]] = ""
        self._in_label = self._node is not None and tag == "text" and "pipeline-node__text" in classes

    def handle_endtag(self, tag):
        if self._selector_depth and tag == "div":
            self._selector_depth -= 1
        if tag == "text":
            self._in_label = False
        if tag == "g":
            self._node = None

    def handle_data(self, data):
        if self._in_label and self._node:
            kind, name = self._node
            self.nodes[kind][name] += data.strip()


def render(url: str) -> RenderedPage:
    result = subprocess.run(
        [
            chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--virtual-time-budget=20000",
            "--window-size=1600,1000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    page = RenderedPage()
    page.feed(result.stdout)
    return page


def pretty(name: str) -> str:
    """kedro-viz's 'Pretty name' label (off by default in 12.5): `episode_index` -> `Episode Index`."""
    spaced = name.replace("-", " ").replace("_", " ").replace(":", ": ").strip()
    return re.sub(r"(^|\s)\S", lambda match: match.group(0).upper(), spaced)


def drawn(names: set[str], nodes: dict[str, str]) -> set[str]:
    """The names drawn as nodes in a view, each labelled with its name (raw or prettified)."""
    return {name for name in names if nodes.get(name) in (name, pretty(name))}


def test_rendered_site_shows_every_pipeline_and_the_versioned_lineage(served, registry, versioned):
    chromium()
    page = render(served)
    assert sorted(page.selector_options) == sorted({*registry, "__default__"}), page.selector_options
    # The default view draws the whole lineage: every dataset of every pipeline.
    assert set(page.nodes["data"]) == set().union(*registry.values()), page.nodes["data"]
    missing = versioned - drawn(versioned, page.nodes["data"])
    assert not missing, f"default view: versioned datasets not drawn with their names: {sorted(missing)}"


@pytest.mark.slow  # one browser start per pipeline: ~5 s each on 2 cores
def test_each_rendered_pipeline_view_shows_its_versioned_datasets(served, registry, versioned):
    chromium()
    for name, datasets in sorted(registry.items()):
        nodes = render(f"{served}?pid={name}").nodes["data"]
        # Exactly this pipeline's datasets: the pipeline was selected, and none of its data is hidden.
        assert set(nodes) == datasets, (name, nodes)
        missing = (datasets & versioned) - drawn(datasets, nodes)
        assert not missing, (
            f"pipeline {name}: versioned datasets not drawn with their names: {sorted(missing)}"
        )
