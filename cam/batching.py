"""How many rows one compiled call scores: one policy for every backend and every method.

Every perturbation method (ablating channels or cells of a layer, occluding or masking the
input) scores many perturbed copies per image, and the copies of all the images in an explain
call form one list of rows. The list is cut into equal compiled calls, the last padded, so a
call never sees a new shape and several images share a call whenever they fit.

How many rows a call takes comes from a memory budget in bytes, divided by what one row
costs: :meth:`cam.graph.Split.bytes_per_row`, four bytes per element of what the scored part
of the network holds for one row (see there).

* On the CPU the budget is :data:`CPU_BUDGET`. On DenseNet-169's last layer (about 340 kB a
  row) that is some 790 rows a call, every ablation of about half an image.
* On an accelerator it is :data:`ACCELERATOR_SHARE` of the device's free memory, read when an
  explainer is built: a call costs about the same whether it scores 64 rows or thousands, so
  larger calls pay.
* ``CAM_MEMORY_BUDGET`` (bytes, or with a K, M or G suffix) overrides both.

No call takes more than :data:`MAX_ROWS` rows.
"""

from __future__ import annotations

import math
import os
import re

from . import backend as B

CPU_BUDGET = 256 * 2**20
ACCELERATOR_SHARE = 0.5
MAX_ROWS = 16384
ENVIRONMENT = "CAM_MEMORY_BUDGET"


def parse_bytes(text: str) -> int:
    """``"512M"``, ``"2G"``, ``"1048576"`` -> bytes; a clear error for anything else."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)i?B?\s*", str(text), re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"{ENVIRONMENT} must be a positive number of bytes, optionally with a "
                         f"K, M or G suffix (e.g. 512M, 2G), got {text!r}")
    scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[match.group(2).upper()]
    return int(float(match.group(1)) * scale)


def memory_budget() -> int:
    """Bytes one compiled call may use: ``CAM_MEMORY_BUDGET``, else a share of the
    accelerator's free memory, else :data:`CPU_BUDGET`."""
    if os.environ.get(ENVIRONMENT):
        return parse_bytes(os.environ[ENVIRONMENT])
    free = B.accelerator_free_bytes()
    return int(free * ACCELERATOR_SHARE) if free else CPU_BUDGET


def rows_per_call(bytes_per_row: int, budget: int | None = None) -> int:
    """The most rows one call takes: the budget over the cost of a row, 1..MAX_ROWS."""
    budget = memory_budget() if budget is None else budget
    return int(max(1, min(MAX_ROWS, budget // max(1, int(bytes_per_row)))))


def plan(total: int, most: int) -> tuple[int, int]:
    """(calls, rows per call) for ``total`` rows at most ``most`` a call: the fewest calls,
    with the rows spread evenly over them so the padding of the last is small."""
    if total < 1 or most < 1:
        raise ValueError(f"need total >= 1 and most >= 1, got {total}, {most}")
    calls = math.ceil(total / most)
    return calls, math.ceil(total / calls)
