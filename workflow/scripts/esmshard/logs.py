"""Logging for the workflow's jobs: everything to the job's log file, warnings and errors also
to stderr so that they reach the terminal running snakemake."""

import logging
import sys


def setup(log_path) -> None:
    to_file = logging.FileHandler(log_path, mode="w")
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    to_terminal = logging.StreamHandler(sys.stderr)
    to_terminal.setLevel(logging.WARNING)
    to_terminal.setFormatter(logging.Formatter("esmshard: %(levelname)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[to_file, to_terminal], force=True)
