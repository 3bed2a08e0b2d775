"""Gating figures for every run in a folder: gates, feedback and plasticity per layer over training,
the RPE distribution, activity maps of sampled trials and, for Brian2 runs, one trial in time;
with gating against outcome printed. Each run's figures go into the subfolder of FOLDER that
lies where the run's folder lies under RUNS (``agrel-sim analyze`` as a script).

    python analysis/gating_figures.py RUNS [--out FOLDER]
"""

import argparse
from pathlib import Path

from agrel_sim.analysis import analyze

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("runs", type=Path)
parser.add_argument("--out", type=Path, default=Path("gating_figures"))
args = parser.parse_args()

text, figures = analyze(args.runs, args.out)
print(text)
print("\n".join(str(f) for f in figures))
