#!/usr/bin/env bash
# The demo: embed demo/proteins.fasta with ESM-2 8M through the whole workflow, on whatever
# GPUs are visible (or the CPU). Without network access to fair-esm's weights it uses a tiny
# ESM-2 with RANDOM weights, generated here, and says so: the workflow is real, the numbers not.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/workflow/scripts${PYTHONPATH:+:$PYTHONPATH}"

model=esm2_t6_8M_UR50D
if ! python -c "from esmshard.model import resolve_checkpoint; resolve_checkpoint('$model')" 2>/dev/null; then
    model=resources/esm2_t2_RANDOM_WEIGHTS_demo_only.pt
    [ -f "$model" ] || python -m esmshard random-checkpoint "$model" --layers 2 --embed-dim 64 --heads 4
    echo "================================================================================"
    echo "esm2_t6_8M_UR50D could not be downloaded: this demo uses $model,"
    echo "an ESM-2 architecture with RANDOM weights. The embeddings are NOT meaningful."
    echo "================================================================================"
fi

# The demo's settings, for the user to continue from (a plain `snakemake` reads config/config.yaml).
cat > demo/config.yaml <<YAML
# Written by demo/run.sh: the demo's input and the model it used. Run it again, or make its
# report, with: snakemake --cores 2 --configfile demo/config.yaml [--report report.html]
fasta:
  - demo/proteins.fasta
model: $model
YAML

snakemake --cores 2 --configfile demo/config.yaml

python - <<'PY'
import json
import h5py
manifest = json.load(open("results/manifest.json"))
with h5py.File(manifest["output"]) as h5:
    (layer,) = h5.attrs["layers"]
    shape = h5[f"mean/layer_{layer}"].shape
    model = h5.attrs["model"]
print(f"\nEmbeddings: {manifest['output']} ({shape[0]} sequences x {shape[1]} dims, model {model});"
      f" {manifest['missing']} missing; manifest: results/manifest.json")
PY
echo
echo "Again, or its report: snakemake --cores 2 --configfile demo/config.yaml [--report report.html]"
echo "Your own data: edit config/config.yaml, then run snakemake (README: Running it on your data)."
