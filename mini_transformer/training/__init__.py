"""The training loop and its parts: schedules, optimizer, FLOPs and MFU, metrics, distributed set-up.

``train`` loads on first use (PEP 562), so that importing one part (``training.flops`` for
the profile table, ``training.metrics`` for the plots) does not import the whole loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["train"]


def __getattr__(name: str) -> Any:
    if name == "train":
        from .loop import train

        globals()["train"] = train  # later lookups skip this function
        return train
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:
    from .loop import train
