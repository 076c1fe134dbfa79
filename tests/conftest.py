"""Session-wide test settings."""

import os

import pytest

# Kedro's telemetry would try the network on every CLI call; CI and users' tests must not.
os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "1")


@pytest.fixture(scope="session")
def collection(tmp_path_factory):
    """(preprocessed_manifest, episode_index) of a small synthetic collection, shared read-only."""
    from training_synthetic import build_collection

    return build_collection(tmp_path_factory.mktemp("train_collection"))


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
