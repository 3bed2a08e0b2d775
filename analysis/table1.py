"""Table 1 of the paper from a folder of finished runs.

    python analysis/table1.py RUNS [--csv PATH]

Prints the table as Markdown (mean ± std of test accuracy over seeds, mean epochs to the
stopping criterion, the DeepAGREL/EBP epoch ratio, how many seeds converged) and writes CSV.
"""

import argparse
from pathlib import Path

from agrel_sim.analysis import load_runs, table1_records
from agrel_sim.table import markdown, table1, write_csv

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("runs", type=Path)
parser.add_argument("--csv", type=Path)
args = parser.parse_args()

table = table1(table1_records(load_runs(args.runs)))
print(markdown(table))
write_csv(table, args.csv or args.runs / "table1.csv")
