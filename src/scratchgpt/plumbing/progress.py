"""Progress bars: tqdm, with its `TQDM_DISABLE` switch honoured by every bar of the project.

tqdm reads `TQDM_DISABLE` only as the default of its `disable` argument (and only when tqdm is
imported), so a call that passes `disable=` itself ignores the variable. Bars made here never do:
`progress_bar` reads the variable on each call.
"""

from __future__ import annotations

import os
from typing import Any

from tqdm.auto import tqdm

ENV_DISABLE = "TQDM_DISABLE"


def progress_bar(*, show: bool | None = True, **kwargs: Any) -> tqdm:
    """A tqdm bar (`kwargs` go to tqdm). `show=False` hides it, `show=None` hides it when the output is
    not a terminal (tqdm's `disable=None`); a non-empty `TQDM_DISABLE` hides it in every case, read as
    tqdm reads it."""
    disable = True if os.environ.get(ENV_DISABLE) or show is False else (None if show is None else False)
    return tqdm(disable=disable, **kwargs)
