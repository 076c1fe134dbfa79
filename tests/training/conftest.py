import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from training_synthetic import build_collection  # noqa: E402


@pytest.fixture(scope="session")
def collection(tmp_path_factory):
    """(preprocessed_manifest, episode_index) shared by the training tests (read-only)."""
    return build_collection(tmp_path_factory.mktemp("train_collection"))


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The CI box has 2 shared cores: intra-op threads oversubscribe it and slow these tests ~6x."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
