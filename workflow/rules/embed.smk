
rule retry_rank:
    output:
        marker=RETRY_MARKER,
    log:
        "logs/embed/retry_{rank}_{failure}.log",
    wildcard_constraints:
        rank=r"\d+",
        failure=r"\w+",
    localrule: True
    conda:
        "../../environment.yml"
    shell:
        "echo 'rank {wildcards.rank} failed last time: retrying it' > {log}; touch {output.marker}"


rule embed:
    input:
        index=rules.index.output.index,
        residues=rules.index.output.residues,
        plan=rules.plan.output.plan,
        checkpoint=MODEL_FILES,
        retry=retry_if_failed,
    output:
        # The declared output is the rank's outcome; the shard itself is written next to it
        # only when complete, so that no failure (and no Snakemake clean-up) can delete it.
        status=paths.STATUS,
    log:
        paths.RANK_LOG,
    wildcard_constraints:
        rank=r"\d+",
    retries: config["retries"]
    conda:
        "../../environment.yml"
    threads: config["threads_per_rank"]
    resources:
        gpu=1,
        attempt=lambda wildcards, attempt: attempt,
    params:
        # next to the declared outputs, so that a module's prefix applies
        shard=lambda wildcards, output: sibling(
            output.status, "shards", f"shard_{wildcards.rank}.h5"
        ),
        store=lambda wildcards, output: sibling(output.status, "store"),
        settings=numeric_settings(),
    script:
        "../scripts/embed.py"
