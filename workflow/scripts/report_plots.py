"""Rule report_plots: the figures and configuration table that snakemake --report shows."""

import gc
import logging
import os
import sys

sys.path.insert(0, os.environ["ESMSHARD_PACKAGE"])  # this workflow's esmshard (rules/package.smk)

from esmshard import logs
from esmshard.report import write_report_files

logs.setup(snakemake.log[0])
log = logging.getLogger("esmshard.report")
outcomes, checks = write_report_files(
    snakemake.input.index,
    snakemake.input.statuses,
    snakemake.input.manifest,
    snakemake.input.embeddings,
    snakemake.params.config,
    {name: snakemake.output[name] for name in ("lengths", "ranks", "embedded", "vectors", "config")},
)
for check in checks:  # on the terminal too: a broken checkpoint must not pass unnoticed
    for problem in check.problems():
        log.warning("the vectors look broken: %s: %s (a wrong or damaged checkpoint?)", check.name, problem)
failed = [outcome.rank for outcome in outcomes if not outcome.ok]
log.info(
    "report figures for %d ranks (%s) written to %s",
    len(outcomes),
    f"failed: {', '.join(map(str, failed))}" if failed else "all succeeded",
    snakemake.output.lengths.rsplit("/", 1)[0],
)
# The job ends here: keep the interpreter's last garbage collection from walking every matplotlib
# object made above (~0.1 s of this job's exit); the operating system frees them.
gc.freeze()
