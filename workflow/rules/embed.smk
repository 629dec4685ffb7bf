
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
        "../envs/esmshard.yaml"
    shell:
        "echo 'rank {wildcards.rank} must be redone ({wildcards.failure}): retrying it' > {log}; touch {output.marker}"


rule embed:
    input:
        index=rules.index.output.index,
        residues=rules.index.output.residues,
        plan=rules.plan.output.plan,
        checkpoint=MODEL_FILES,
        retry=retry_if_failed,
    output:
        # A rank that fails for good still ends successfully, with a failure shard and a
        # failed status. Snakemake deletes both before every attempt: finished work lives in
        # the store (params.store, which no rule declares), so a shard is assembled again
        # from it without computing.
        shard=paths.SHARD,
        status=paths.STATUS,
    log:
        paths.RANK_LOG,
    wildcard_constraints:
        rank=r"\d+",
    conda:
        "../envs/esmshard.yaml"
    threads: config["threads_per_rank"]
    resources:
        gpu=1,
        # the last attempt records a failure instead of raising
        attempt=lambda wildcards, attempt: attempt,
        attempts=rank_attempts,
    params:
        # next to the declared outputs, so that a module's prefix applies
        store=lambda wildcards, output: sibling(output.status, "store"),
        settings=numeric_settings(),
    script:
        "../scripts/embed.py"
