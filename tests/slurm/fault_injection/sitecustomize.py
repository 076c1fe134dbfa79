"""Fault injection for tests/slurm: a crashed rank, with the launcher and train loop left untouched.

Python imports ``sitecustomize`` at start-up from the first ``sys.path`` entry that has one, so putting this
folder on PYTHONPATH reaches every process of a SLURM job (sbatch passes the environment on). In the task
whose ``SLURM_PROCID`` equals ``IRIS_TEST_FAIL_RANK``, the train loop's loss raises at the first step: the
other rank is then left waiting in its gradient all-reduce, as with a real crash.
"""

import os
import sys

if os.environ.get("IRIS_TEST_FAIL_RANK") not in (None, "") and os.environ.get(
    "SLURM_PROCID"
) == os.environ.get("IRIS_TEST_FAIL_RANK"):
    import importlib.abc
    import importlib.util

    TARGET = "iris_pipelines.training.loop"

    def _broken_loss(*_args, **_kwargs):
        raise RuntimeError(f"injected failure on rank {os.environ['SLURM_PROCID']} (IRIS_TEST_FAIL_RANK)")

    class _BreakLoss(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name != TARGET:
                return None
            sys.meta_path.remove(self)  # find the real module below, once
            spec = importlib.util.find_spec(name)
            load = spec.loader.exec_module

            def exec_module(module):
                load(module)
                module.segmentation_loss = _broken_loss

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _BreakLoss())
