"""The soak's modules live in ``bench/``, a directory of scripts rather than a package: put it on the path.

Appended, not prepended: ``bench/`` also holds modules with common names
(``app``, ``server``) that must never shadow anything else a test imports.
"""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"
if str(BENCH) not in sys.path:
    sys.path.append(str(BENCH))
