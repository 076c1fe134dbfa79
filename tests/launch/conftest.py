import pytest


@pytest.fixture(autouse=True, scope="module")
def _single_torch_thread(one_torch_thread):
    yield
