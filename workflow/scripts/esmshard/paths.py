"""Where the workflow puts what the Python API reads: the rules declare these paths as their
outputs and logs, and ``api`` finds them in the output directory (relative to the working
directory; a Snakemake module's prefix goes in front). Standard library only: the rule files
read this while the workflow is parsed."""

from pathlib import Path

# The workflow this package belongs to: the folder holding scripts/esmshard (a checkout, or the
# copy a module from git makes), else the copy an installed wheel carries as esmshard/workflow.
_HERE = Path(__file__).resolve().parent
_IN_WORKFLOW = _HERE.parent.name == "scripts" and (_HERE.parents[1] / "schemas").is_dir()
WORKFLOW_DIR = _HERE.parents[1] if _IN_WORKFLOW else _HERE / "workflow"


INDEX = "results/index/sequences.h5"
RESIDUES = "results/index/residues.bin"
PLAN = "results/plan.h5"
SHARD = "results/shards/shard_{rank}.h5"
STATUS = "results/status/rank_{rank}.json"
RANK_LOG = "logs/embed/rank_{rank}.log"
EMBEDDINGS = "results/embeddings.h5"
MANIFEST = "results/manifest.json"
MISSING_IDS = "results/missing_ids.txt"

# esmshard embed's working folder (index, plan, store) beside its output: OUT.h5 -> OUT.h5.esmshard
EMBED_WORK_SUFFIX = ".esmshard"
