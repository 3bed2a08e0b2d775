"""Gating figures for every run in a folder: ``agrel-sim analyze`` as a script.

    python analysis/gating_figures.py RUNS [--out FOLDER] [--trial N]

Gates, feedback and plasticity per layer over training, the alignment of feedback with
feedforward weights, the RPE distribution, activity maps of sampled trials and, for Brian2
runs, one trial in time; gating on rewarded against unrewarded
trials printed. Each run's figures go into the subfolder of FOLDER (default RUNS/analysis) that
lies where the run's folder lies under RUNS.
"""

import sys

from agrel_sim.cli import main

sys.exit(main(["analyze", *sys.argv[1:]]))
