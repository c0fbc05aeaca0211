"""The study end to end (``esn run``): the run configuration, datasets, the resumable record, select,
evaluate and report stages in one run directory, the human listening kit and the demo."""
