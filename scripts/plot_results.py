"""The paper's figures from run directories (rules: results/figures.py).

    python scripts/plot_results.py fig3 [--runs outputs/runs] [--protocol paper] [--tasks ...] [--out figures/]
        Figure 3: accuracy vs N_e per task, one line per Lily placement.
    python scripts/plot_results.py fig4 [--runs outputs/runs] [--method lily_vim] [--layers 2 13 22] [--kind in_proj]
        Figure 4: expert weights of chosen layers in each task's selected run.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from results.figures import main  # noqa: E402

if __name__ == "__main__":
    main()
