"""`meshplan calibrate`: fit a cluster spec's physical parameters to measured runs.

runs.py reads the runs (run reports, the JSONL contract), parameters.py lists what may be fitted and when the
runs can say anything about it, fitting.py chooses, fits and cross-checks, result.py assembles the calibrated
cluster spec and its record, command.py is the CLI command and its tables.
"""
