"""`fishds compare` (fishds/compare.py) from a checkout: `python bench/compare.py --config X [--quick] ...`; results
default to bench/results and the runs to runs/compare of this repository."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fishds.compare import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(repo=ROOT))
