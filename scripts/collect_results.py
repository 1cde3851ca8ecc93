"""The paper's VTAB-1k tables from run directories (rules: results/tables.py).

    python scripts/collect_results.py [--runs outputs/runs] [--protocol paper|final|search]
                                      [--out outputs/tables] [--search method.ne,method.scale]

Prints the Markdown tables and writes table_<protocol>.md/.csv/.tex and cells_<protocol>.csv
(the selected grid point and run directories of every cell).

    python scripts/collect_results.py --published vit|vim [--runs outputs/runs] [--protocol final|paper]

The authors' published numbers (from the specs) beside ours, every row labelled with its selection
protocol and recipe (results/published.py); writes published_<vit|vim>.md/.csv.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if __name__ == "__main__":
    if any(a == "--published" or a.startswith("--published=") for a in sys.argv[1:]):
        from results.published import main
    else:
        from results.tables import main
    main()
