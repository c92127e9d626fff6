"""``fedpeft compare``: sweep strategies x ``--vary`` values x seeds and tabulate the runs.

Three steps, a module each: :mod:`.planning` parses the flags and plans and validates the
cells, :mod:`.running` runs each cell as an ordinary ``fedpeft run`` in a subprocess, and
:mod:`.tabulating` reads the run folders into a table and plots (drawn by
:mod:`fedpeft.plots`, with a single run's plots).
"""

from fedpeft.tools.compare.planning import (
    CELLS_DIR,
    Cell,
    Sweep,
    cell_id,
    parse_names,
    parse_seeds,
    parse_vary,
    plan_cells,
    plan_sweep,
    split_top_level,
    validate_cells,
)
from fedpeft.tools.compare.running import LOG_FILE, run_cell, run_compare
from fedpeft.tools.compare.tabulating import (
    CSV_FILE,
    MD_FILE,
    STAT_COLUMNS,
    plot_rows,
    summarise_cells,
    write_table,
)

__all__ = [
    "CELLS_DIR",
    "CSV_FILE",
    "LOG_FILE",
    "MD_FILE",
    "STAT_COLUMNS",
    "Cell",
    "Sweep",
    "cell_id",
    "parse_names",
    "parse_seeds",
    "parse_vary",
    "plan_cells",
    "plan_sweep",
    "plot_rows",
    "run_cell",
    "run_compare",
    "split_top_level",
    "summarise_cells",
    "validate_cells",
    "write_table",
]
