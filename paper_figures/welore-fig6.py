"""WeLore Figure 6: layer-wise rank reduction ratio at 50% ERR, LRC vs N-LRC (from the compress run's allocation.csv).

Rebuilt from the results store only (nothing is recomputed):

    python paper_figures/welore-fig6.py --preset cpu-small     # -> paper_figures/welore-fig6-cpu-small.png
    deftlab run welore-fig6 --preset cpu-small                 # records the runs it plots
"""

import sys
from pathlib import Path

# this checkout's deftlab first (also over an install from another checkout), so results and figures stay here
ROOT = Path(__file__).resolve().parent.parent
if (ROOT / "deftlab").is_dir():
    sys.path.insert(0, str(ROOT))

from deftlab.experiments.figures import figure_main  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return figure_main("welore-fig6", argv)


if __name__ == "__main__":
    sys.exit(main())
