"""Session-wide test settings."""

import os

import pytest

# Kedro's telemetry would try the network on every CLI call; CI and users' tests must not.
os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "1")
# A CI shell's FORCE_COLOR makes rich colour numbers and paths in the CLI's output and Kedro's logs, which
# the tests read as text (this process and every `kedro`/`iris` it starts inherit the cleaned environment).
for _colour_setting in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
    os.environ.pop(_colour_setting, None)


@pytest.fixture(scope="session")
def collection(tmp_path_factory):
    """(preprocessed_manifest, episode_index) of a small synthetic collection, shared read-only."""
    from training_synthetic import build_collection

    return build_collection(tmp_path_factory.mktemp("train_collection"))


@pytest.fixture
def group_umask():
    """umask 022, as on a shared cluster account; yields a check that everything under a path got the
    umask's mode (files 0644, folders 0755), not a temporary file's private 0600 / 0700."""
    from pathlib import Path

    def check(*roots) -> None:
        paths = [p for root in map(Path, roots) for p in [root, *(root.rglob("*") if root.is_dir() else [])]]
        found = {str(p): oct(p.stat().st_mode & 0o777) for p in paths}
        assert found == {str(p): oct(0o755 if p.is_dir() else 0o644) for p in paths}

    before = os.umask(0o022)
    yield check
    os.umask(before)


@pytest.fixture(scope="module")
def one_torch_thread():
    """The CI box has 2 shared cores: intra-op threads oversubscribe it and slow training tests ~6x."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def untrained_bundle(collection):
    """An untrained tiny model bundle over ``collection`` with a filled memory bank: for the plumbing of
    embed_tasks/evaluate/tsne, not their accuracy."""
    import torch

    from iris_pipelines.inference.bundle import ModelBundle
    from iris_pipelines.model import Iris, IrisConfig
    from iris_pipelines.training import train_class_ids

    class_ids = train_class_ids(collection[1])
    torch.manual_seed(0)
    model = Iris(IrisConfig.tiny(memory_bank_size=len(class_ids)))
    ids = torch.tensor(sorted(class_ids.values()))
    model.update_memory_bank(ids, torch.randn(len(ids), *model.memory_bank.shape[1:]))  # as training would
    return ModelBundle.from_model(model, class_ids, {"weights_checksum": ["f00d"], "final_step": 0})
