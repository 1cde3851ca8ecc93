"""The paper's VTAB-1k tables from run directories (rules: results/tables.py).

    python scripts/collect_results.py [--runs outputs/runs] [--protocol paper|final|search]
                                      [--out outputs/tables] [--search method.ne,method.scale]

Prints the Markdown tables and writes table_<protocol>.md/.csv/.tex and cells_<protocol>.csv
(the selected grid point and run directories of every cell).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from results.tables import main  # noqa: E402

if __name__ == "__main__":
    main()
