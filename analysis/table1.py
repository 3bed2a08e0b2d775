"""Table 1 of the paper from a folder of finished runs: ``agrel-sim table`` as a script.

    python analysis/table1.py RUNS [--csv PATH]

Prints the table as Markdown (mean ± std of test accuracy over seeds, mean epochs to the
stopping criterion, the DeepAGREL/EBP epoch ratio, how many seeds converged) and writes CSV.
"""

import sys

from agrel_sim.cli import main

sys.exit(main(["table", *sys.argv[1:]]))
