"""Run directories -> variants -> the paper's tables and figures, and the clean protocol.

- ``results.runs``: read every ``results.json`` under a runs folder into a DataFrame; group
  runs into *variants* (everything in a run's identity except the searched
  hyper-parameters, the seed and the task) and *grid points* (the searched values).
- ``results.tables``: per (variant, task) the grid point the protocol selects, mean +- std
  over seeds, group means; Markdown, CSV and LaTeX without optional dependencies.
- ``results.figures``: Figure 3 (accuracy vs N_e) and Figure 4 (expert weights per layer).
- ``results.clean``: the two-stage clean protocol (search on val200, retrain, test once).

Nothing here imports torch; matplotlib only in ``results.figures``.
"""
