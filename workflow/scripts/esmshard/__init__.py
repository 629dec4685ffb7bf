"""esmshard: ESM-2 embeddings for large FASTA inputs, one shard per GPU rank.

One module per concern; none of them but ``api`` knows about Snakemake:

- ``fasta``: streaming FASTA reading and validation
- ``index``: the sequence index (IDs, sources, offsets, lengths, cleaned residues)
- ``plan``: balancing sequences over ranks
- ``gpu``: counting GPUs and leasing one exclusively
- ``architectures``: which model the ``model`` option names, its files and their identity
- ``huggingface``: Hugging Face ESM-2 directories and the hub cache (standard library only)
- ``model``: loading ESM-2 (fair-esm checkpoints, Hugging Face weights) into fair-esm's module
- ``batching``: token-budget batches
- ``packed``: ESM-2 over packed (unpadded) token streams
- ``engine``: forward passes (fair-esm reference and packed) and pooling
- ``shard``: shard files
- ``rank``: one rank's run, from index to shard
- ``chunks``: finished work inside a rank, kept across crashes
- ``aggregate``: merging shards into one file and reporting what is missing
- ``outputs``: which layers and poolings are stored, and windows for long proteins
- ``reader``: reading embeddings back by ID, and exporting them
- ``report``: the figures and configuration table of ``snakemake --report``
- ``api``: running the whole workflow from Python (``run_multi_gpu_inference``,
  ``run_esm2_multi_gpu``, importable from ``esmshard`` itself)
- ``inprocess``: embedding in the calling process, without Snakemake (``esmshard.embed``)
- ``paths``: where the rules put what the API reads (standard library only)
"""


class EsmShardError(Exception):
    """An error the user can fix; the message says what and where, in one line."""


def __getattr__(name):
    # The entry points load on first use: every rule script imports this package, and none
    # of them needs the API's imports (nor could the API's modules import this one half-done).
    if name in ("run_multi_gpu_inference", "run_esm2_multi_gpu"):
        from esmshard import api

        return getattr(api, name)
    if name == "embed":
        from esmshard import inprocess

        return inprocess.embed
    raise AttributeError(f"module 'esmshard' has no attribute {name!r}")
