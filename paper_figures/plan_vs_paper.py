"""DeFT Tables 4 and 9's memory beside `deftlab plan`'s predictions (shapes only, nothing is run):

    python paper_figures/plan_vs_paper.py     # -> paper_figures/tables/plan-vs-paper.md
"""

import sys
from pathlib import Path

# this checkout's deftlab first (also over an install from another checkout)
ROOT = Path(__file__).resolve().parent.parent
if (ROOT / "deftlab").is_dir():
    sys.path.insert(0, str(ROOT))

from deftlab.experiments.memory_table import write_memory_tables  # noqa: E402


def main() -> int:
    print(write_memory_tables())
    return 0


if __name__ == "__main__":
    sys.exit(main())
