"""The parts of `make bench` (scripts/bench.py), which `make soak` (scripts/soak.py) shares.

One subject a module, each depending only on those above it:

- `config`: where things are, the measured request, the bench's one settings
  object and its error type;
- `machine`: wrk (installed when missing) and the versions and hardware
  recorded with the results;
- `tokens`: the bench issuer's keys on disk and the pools of minted tokens;
- `plan`: the cases, the variants (which server, protocol and floor each has)
  and the order of a bench's runs;
- `topology`: the measured policy and Envoy's listeners, one per variant;
- `processes`: the no-op server's process and the /proc readings (CPU, RSS);
- `runner`: one wrk run and its result, repeated while others disturb it, and
  the sanity checks made before any run;
- `summary`: medians, ratios, targets and the printed tables; results.json's values;
- `soak_runs`, `soak_outcome` (scripts/soak.py): a soak's settings and runs, then
  its RSS verdict and report.

Importing the package puts the repository first on sys.path: the harness in
tests/support runs Envoy and the sidecar, both for `python scripts/bench.py`
(where only scripts/ is on it) and for the tests that import these modules.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the harness in tests/support runs Envoy and the sidecar
