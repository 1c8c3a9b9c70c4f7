"""The training loop and its parts: schedules, optimizer, metrics, distributed set-up."""

from .loop import train

__all__ = ["train"]
