"""Which line of the user's code a warning names: the first frame outside lrctl and the
libraries that call into it (torch runs the optimizer's pre-step hook; the Hugging Face
Trainer and Lightning call the callbacks), so a warning points at the script's own
``optimizer.step()``, ``ctl.step(loss)`` or ``trainer.train()``, not at library code.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from types import FrameType

__all__ = ["callers_level"]

_LRCTL = os.path.dirname(os.path.abspath(__file__)) + os.sep
# Top-level packages whose frames are never the user's (only those imported are looked up).
_LIBRARIES = ("torch", "transformers", "accelerate", "lightning", "pytorch_lightning",
              "lightning_fabric")


def callers_level() -> int:
    """``warnings.warn``'s ``stacklevel`` for a call made by the function that called this
    one (``warnings.warn(..., stacklevel=callers_level())`` inside a warning helper): the
    first frame above that helper outside lrctl and :data:`_LIBRARIES`."""
    inside = [_LRCTL]
    for name in _LIBRARIES:
        path = getattr(sys.modules.get(name), "__file__", None)
        if path:
            inside.append(os.path.dirname(os.path.abspath(path)) + os.sep)
    prefixes = tuple(inside)
    level = 2
    frame: FrameType | None = sys._getframe(2)  # 1: the warning helper; 2: its caller
    while frame is not None and frame.f_code.co_filename.startswith(prefixes):
        level, frame = level + 1, frame.f_back
    return level
