"""The README's Python examples run as written, and its feedback-alignment figures are what its
example gives."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agrel_sim import load_run

README = Path(__file__).resolve().parents[1] / "README.md"
# Examples that read runs made by the README's commands (a Brian2 run, a whole table) are left out.
NEEDS_RUNS = ("runs/digits_", "runs/table1")
# The example that gives the table of feedback alignment.
ALIGNMENT_EXAMPLE = 'load_run(f"runs/alignment_{decay}/run.h5").alignment()'


def python_examples() -> list[tuple[int, str]]:
    """The README's ``python`` blocks that need no run made beforehand, with their first lines."""
    text = README.read_text()
    return [
        (text.count("\n", 0, match.start()) + 2, match.group(1))
        for match in re.finditer(r"^```python\n(.*?)^```$", text, re.S | re.M)
        if not any(path in match.group(1) for path in NEEDS_RUNS)
    ]


def alignment_table() -> dict[tuple[float, str], list[float]]:
    """The README's table of feedback alignment: ``{(weight decay, layer): cosines by epoch}``."""
    rows = re.findall(r"^\| ([\d.]+) \| `([\w.]+)` \| ([\d., ]+) \|$", README.read_text(), re.M)
    return {(float(decay), layer): [float(v) for v in values.split(",")] for decay, layer, values in rows}


def test_the_readme_has_examples_and_the_alignment_table():
    assert len(python_examples()) >= 3
    assert len(alignment_table()) == 4
    assert sum(ALIGNMENT_EXAMPLE in code for _, code in python_examples()) == 1, "the alignment table's example, checked below"


@pytest.mark.parametrize("line, code", [pytest.param(line, code, id=f"line{line}") for line, code in python_examples()])
def test_a_readme_example_runs_as_written(tmp_path, line, code):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the README's figures were measured so
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert done.returncode == 0, f"README.md line {line}:\n{done.stderr[-3000:]}"
    for printed in re.findall(r"# prints (\S+)", code):  # what the README says an example prints
        assert printed in done.stdout.split(), f"README.md line {line}: prints {done.stdout!r}, not {printed}"
    if ALIGNMENT_EXAMPLE in code:
        for (decay, layer), cosines in alignment_table().items():
            measured = load_run(tmp_path / f"runs/alignment_{decay}/run.h5").alignment()[layer]
            np.testing.assert_allclose(measured, cosines, atol=0.01, err_msg=f"README.md: weight decay {decay}, {layer}")
