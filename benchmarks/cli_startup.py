"""How long the command line takes to answer before any work: ``cellmorph --help`` and each command's help.

    python benchmarks/cli_startup.py [--repeats 7]

Each command runs ``--repeats`` times in a fresh process; the table gives the median wall time. For a
ratio measured in the same run, the last row imports the fold loop (``cellmorph.cv.run``: torch, timm,
pandas), which every command's help paid before the settings records moved to ``cellmorph.config``
(issue 30). Timings belong here, never in tests; the suite checks only that the CLI's import loads
neither torch nor pandas (``tests/test_api.py``).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

CLI = [sys.executable, "-m", "cellmorph"]
CASES = {
    "cellmorph --help": [*CLI, "--help"],
    "cellmorph cv --help": [*CLI, "cv", "--help"],
    "cellmorph predict --help": [*CLI, "predict", "--help"],
    "cellmorph prepare --help": [*CLI, "prepare", "--help"],
    "python -c 'import cellmorph'": [sys.executable, "-c", "import cellmorph"],
    "reference: python -c 'import cellmorph.cv.run'": [sys.executable, "-c", "import cellmorph.cv.run"],
}


def wall(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    for command in CASES.values():  # warm the file cache once
        wall(command)
    medians = {name: statistics.median(wall(c) for _ in range(args.repeats)) for name, c in CASES.items()}
    reference = medians[list(CASES)[-1]]
    print(f"{Path(sys.executable).name}, median of {args.repeats} fresh processes\n")
    print("| command | median wall | against importing the fold loop |\n|---|---|---|")
    for name, seconds in medians.items():
        print(f"| `{name}` | {seconds:.2f} s | {seconds / reference:.2f}× |")


if __name__ == "__main__":
    main()
