"""scripts/segmentation_overlay.py on a project copy holding a tiny untrained model and the synthetic
collection: the plumbing of the docs screenshot, not its accuracy."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from kedro.config import OmegaConfigLoader
from kedro.io import DataCatalog
from project_copy import PROJECT_ROOT, copy_project

from iris_pipelines.inference.bundle import ModelBundle
from iris_pipelines.model import Iris, IrisConfig
from iris_pipelines.training import train_class_ids

SCRIPT = PROJECT_ROOT / "scripts" / "segmentation_overlay.py"
ENV = "overlay_null_roi"


def test_a_left_out_roi_size_uses_the_models_training_crop(tmp_path: Path, collection) -> None:
    """README: evaluate.roi_size left out means the model's training crop, as evaluate does; the script
    (and the notebook it mirrors) failed with TypeError on tuple(None)."""
    root = copy_project(tmp_path / "project")
    (root / "conf" / ENV).mkdir()
    no_roi_size = yaml.safe_dump({"evaluate": {"roi_size": None}})  # soft merge: the rest from base
    (root / "conf" / ENV / "parameters_evaluate.yml").write_text(no_roi_size)

    manifest, index = collection
    torch.manual_seed(0)
    class_ids = train_class_ids(index)
    # The training crop the script must fall back to: 32³, not the 128³ of a bundle that records none.
    bundle = ModelBundle.from_model(
        Iris(IrisConfig.tiny(memory_bank_size=len(class_ids))),
        class_ids,
        {"final_step": 0, "train_config": {"crop_size": [32, 32, 32]}},
    )
    loader = OmegaConfigLoader(str(root / "conf"), base_env="base", default_run_env="local")
    loader["globals"] = {"data_root": str(root / "data")}
    inputs = {
        "iris_model": bundle,
        "registered_model": {"name": "iris", "version": "1", "model_uri": "models:/iris/1"},
        "episode_index": index,
        "preprocessed_manifest": manifest,
    }
    catalog = DataCatalog.from_config({name: loader["catalog"][name] for name in inputs})
    for name, value in inputs.items():
        catalog.save(name, value)

    out = tmp_path / "overlay.png"
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--project", str(root), "--env", ENV, "--out", str(out)],
        cwd=root,
        env={**env, "KEDRO_DISABLE_TELEMETRY": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "window 32x32x32 voxels" in done.stdout
    assert out.read_bytes().startswith(b"\x89PNG")
