"""Figure 3 of the paper from a folder of finished runs: ``agrel-sim figure3`` as a script.

    python analysis/figure3.py RUNS [--out PATH]

Reward probability per epoch, DeepAGREL against EBP, mean ± 2σ over seeds, into PATH (default
RUNS/figure3.png; the suffix names the format). RUNS is searched for run files below it and
holds runs of both rules (e.g. runs/table1); each Table 1 row among them (data set, network,
augmentation) gets a panel of its own. As Table 1, it averages the complete runs and refuses
runs of one row made with different settings (a line says why, and the other rows are drawn);
the legend says how many runs the first and the last epoch average, and no band is drawn where
one run remains.
"""

import sys

from agrel_sim.cli import main

sys.exit(main(["figure3", *sys.argv[1:]]))
