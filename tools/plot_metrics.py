"""Plot a run's train and val loss against steps and tokens.

python tools/plot_metrics.py RUN_DIR [--out PNG]       (default: RUN_DIR/loss.png)
"""

from __future__ import annotations

import argparse
import sys

from lmtrain.errors import LmTrainError
from lmtrain.plot import plot_metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="plot_metrics.py", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the --out-dir of a training run")
    parser.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/loss.png)")
    args = parser.parse_args(argv)
    try:
        print(plot_metrics(args.run_dir, args.out))
    except LmTrainError as e:
        print(f"plot_metrics: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
