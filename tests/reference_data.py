"""Where the published VRG reference data lives, if anywhere (tests that need it skip without it).

Looked up in order: ``$VRG_REFERENCE_DIR``, ``../shared/reference`` beside the checkout, ``/work/shared/reference``.
"""

from __future__ import annotations

import os
from pathlib import Path

_CANDIDATES = [
    os.environ.get("VRG_REFERENCE_DIR", ""),
    str(Path(__file__).resolve().parents[2] / "shared" / "reference"),
    "/work/shared/reference",
]

REF = next((Path(c) for c in _CANDIDATES if c and (Path(c) / "MSE_vs_alpha_bar_cifar10.txt").is_file()),
           Path(_CANDIDATES[1]))
