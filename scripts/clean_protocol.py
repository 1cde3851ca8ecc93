"""The clean protocol in one command (details: results/clean.py).

    python scripts/clean_protocol.py <train.py overrides> [--seeds 42,43,44] [--search keys] [--out DIR]
    e.g. python scripts/clean_protocol.py task=dtd,eurosat method=lily_kvffn sweep=ne_scale \
             hydra/launcher=joblib hydra.launcher.n_jobs=4 --seeds 42,43,44

Stage 1 trains the grid on train800 and evaluates on val200 only; the best grid point per
(variant, task) is written to <output_dir>/chosen/experiment/<variant>/<task>.yaml; stage 2
retrains only those on train800val200 (one run per seed) and tests once; the table follows.
Re-running the command skips every finished run.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from results.clean import main  # noqa: E402

if __name__ == "__main__":
    main()
