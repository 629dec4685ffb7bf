"""esmshard: protein language-model embeddings (ESM-2, ESM-1b/ESM-1v, ESM C, ProtT5) for large
FASTA inputs, one shard per GPU rank.

One module per concern; none of them but ``api`` and ``mainprocess`` knows about Snakemake.

Input and plan:
- ``fasta``: streaming FASTA reading and validation
- ``index``: the sequence index (IDs, sources, offsets, lengths, cleaned residues)
- ``plan``: balancing distinct sequences over ranks
- ``outputs``: which layers and poolings are stored, and windows for long proteins

The model:
- ``architectures``: which model the ``model`` option names, its family, files and identity
- ``huggingface``: Hugging Face ESM and T5 directories and the hub cache (standard library only)
- ``model``: loading a model (fair-esm checkpoints, ESM C state dicts, Hugging Face weights) into
  its family's module (fair-esm's ESM2 or ProteinBertModel, ``esmc.ESMC``, ``prott5.ProtT5``)
- ``esmc``, ``prott5``: ESM C's and ProtT5's modules, without EvolutionaryScale's package or
  transformers
- ``packed``, ``rotary_kernel``, ``norm_kernel``, ``swiglu_kernel``: every family over packed
  (unpadded) token streams, with Triton kernels on CUDA
- ``batching``: token-budget batches (a long protein's windows spread over several)
- ``engine``: the engine interface a rank uses, and the engines: fair-esm reference and packed

A rank:
- ``gpu``: counting GPUs and leasing one exclusively
- ``work``: a rank's settings, its share of the plan and what identifies its shard
- ``rank``: one rank's run, from its share of the plan to its shard, through the store
- ``store``: finished work kept by content, across crashes and runs
- ``shard``: shard files
- ``status``: a rank's outcome, and which ranks the next run redoes (standard library only)
- ``stopping``, ``progress``, ``logs``, ``faults``: stop signals and time limits, progress (each
  rank's, and all ranks' together), job logs, faults on purpose for the crash tests

After the ranks:
- ``aggregate``: merging shards into one file and reporting what is missing (it only reads)
- ``reader``: reading embeddings back by ID, and exporting them
- ``report``: the figures and configuration table of ``snakemake --report``

Around them:
- ``settings``: the workflow's options, from its schema (standard library and PyYAML)
- ``paths``: where the rules put what the API reads (standard library only)
- ``files``: atomic writes and space checks (standard library only)
- ``mainprocess``: Snakemake's main process: the results folder's lock, naming failed jobs, its
  timers at exit
- ``api``: running the whole workflow from Python (``run_multi_gpu_inference``,
  ``run_esm2_multi_gpu``, importable from ``esmshard`` itself)
- ``inprocess``: embedding in the calling process, without Snakemake (``esmshard.embed``,
  ``esmshard.embed_files``)
- ``__main__``: the command-line tools (``python -m esmshard``)
"""

__version__ = "0.1.0"  # the package's (pyproject.toml reads it), in every output; CITATION.cff repeats it


class EsmShardError(Exception):
    """An error the user can fix; the message says what and where, in one line."""


def __getattr__(name):
    # The entry points load on first use: every rule script imports this package, and none
    # of them needs the API's imports (nor could the API's modules import this one half-done).
    if name in ("run_multi_gpu_inference", "run_esm2_multi_gpu"):
        from esmshard import api

        return getattr(api, name)
    if name in ("embed", "embed_files"):
        from esmshard import inprocess

        return getattr(inprocess, name)
    raise AttributeError(f"module 'esmshard' has no attribute {name!r}")
