"""Where embed_tasks, evaluate and `iris segment` run: one spelling, refused early when it cannot be."""

import pytest
import torch

from iris_pipelines.evaluation import EvaluateParams
from iris_pipelines.inference.device import resolve_device


def test_auto_picks_the_gpu_when_there_is_one_else_the_cpu():
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("name", ["gpu0", "gpu", "CPU", "mps", "xla", "meta", "cuda:x", "cpu:0", " cpu"])
def test_a_device_other_than_auto_cpu_or_cuda_is_named_with_the_choices(name):
    """torch parses mps, xla or meta and fails only when the model is moved there (a traceback), and answers a
    typo such as "gpu" with its list of ~20 device types this code never runs on."""
    with pytest.raises(ValueError) as caught:
        resolve_device(name)
    assert str(caught.value) == f"device {name!r}: expected auto, cpu, cuda or cuda:N"


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for CUDA on a machine without it")
def test_cuda_without_a_gpu_fails_when_the_settings_are_read_not_after_loading_scans():
    with pytest.raises(ValueError, match=r"device 'cuda': no CUDA device is available; use cpu or auto"):
        EvaluateParams(device="cuda")


def test_a_gpu_index_the_machine_lacks_is_refused_when_the_settings_are_read(monkeypatch):
    """torch accepts cuda:1 on a one-GPU machine and fails only when the model is moved there: after every
    scan is loaded, or (iris review --reproduce of a run made on a GPU node's second GPU) mid-pipeline."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    refused = r"device 'cuda:1': this machine has 1 CUDA device\(s\), cuda:0 to cuda:0"
    with pytest.raises(ValueError, match=refused):
        resolve_device("cuda:1")
