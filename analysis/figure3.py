"""Figure 3 of the paper: reward probability per epoch, DeepAGREL against EBP, mean ± 2σ over seeds.

    python analysis/figure3.py RUNS [--out figure3.png]

RUNS holds runs of both rules (e.g. runs/table1/cifar10_conv3_*); each Table 1 row among them
(data set, network, augmentation) gets a panel of its own. As Table 1, it averages the complete
runs and refuses runs of one row made with different settings; the legend says how many runs
the first and the last epoch average, and no band is drawn where one run remains.
"""

import argparse
from pathlib import Path

from agrel_sim.analysis import load_runs, plot_reward_curves

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("runs", type=Path, nargs="+", help="run files or folders of runs")
parser.add_argument("--out", type=Path, default=Path("figure3.png"))
args = parser.parse_args()

runs = [run for path in args.runs for run in load_runs(path)]
print(plot_reward_curves(runs, args.out))
