import os
import sys

import pytest
import torch

# One thread: the suite's models are tiny, and with a busy second core a 2-thread OpenMP pool
# spends more time waiting for its other thread than computing (10-40x slower per call).
torch.set_num_threads(1)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the ``gpu`` tier where there is no CUDA device, with the reason in the summary.

    The tiers (markers registered in pyproject.toml): ``make test`` runs everything, ``make
    test-fast`` leaves out ``slow``; ``gpu`` tests run wherever CUDA is available.
    """
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu tier: needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture
def run_cli(capsys):
    """Run the CLI in-process; returns (status, stdout, stderr)."""
    from mini_transformer.cli import main

    def run(*argv: str):
        status = main(list(argv))
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    return run


def python_exe() -> str:
    return sys.executable
