import os
import sys

import pytest
import torch

# Keep the suite quick and repeatable on a 2-core machine.
torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
