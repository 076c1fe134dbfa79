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
