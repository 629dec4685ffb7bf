# Plotting takes about a second: on a cluster it runs where snakemake runs rather than waiting
# in the queue for a job of its own.
rule report_plots:
    input:
        index=rules.index.output.index,
        statuses=expand(rules.embed.output.status, rank=RANKS),
        manifest=rules.aggregate.output.manifest,
        embeddings=rules.aggregate.output.embeddings,
    output:
        lengths=report(
            "results/report/sequence_lengths.png",
            caption="../report/sequence_lengths.rst",
            category="Input",
            labels={"figure": "sequence lengths"},
        ),
        ranks=report(
            "results/report/rank_throughput.png",
            caption="../report/rank_throughput.rst",
            category="Ranks",
            labels={"figure": "residues/s and wall time per rank"},
        ),
        embedded=report(
            "results/report/sequences_embedded.png",
            caption="../report/sequences_embedded.rst",
            category="Output",
            labels={"figure": "sequences embedded and missing"},
        ),
        vectors=report(
            "results/report/vectors.png",
            caption="../report/vectors.rst",
            category="Vectors",
            labels={"figure": "PCA and norms of the vectors"},
        ),
        config=report(
            "results/report/config.html",
            caption="../report/config.rst",
            category="Configuration",
            labels={"table": "configuration used"},
        ),
    log:
        "logs/report_plots.log",
    localrule: True
    conda:
        "../envs/esmshard.yaml"
    params:
        # The whole configuration, defaults included: the table must show what the run used,
        # and a changed value redraws it (the params rerun trigger).
        config={
            "fasta": FASTA_FILES,
            "model": config["model"],
            "world_size": WORLD_SIZE,
            "invalid_residues": config["invalid_residues"],
            **numeric_settings(),
            "require_complete": config["require_complete"],
            "compression": config["compression"],  # of embeddings.h5
        },
    script:
        "../scripts/report_plots.py"
