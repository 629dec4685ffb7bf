rule aggregate:
    input:
        index=rules.index.output.index,
        plan=rules.plan.output.plan,
        # Every rank ends with a shard and a status, failed or not; the script merges the
        # shards of the ranks that succeeded.
        shards=expand(rules.embed.output.shard, rank=RANKS),
        statuses=expand(rules.embed.output.status, rank=RANKS),
    output:
        embeddings=paths.EMBEDDINGS,
        manifest=paths.MANIFEST,
        missing=paths.MISSING_IDS,
    log:
        "logs/aggregate.log",
    conda:
        "../envs/esmshard.yaml"
    params:
        require_complete=config["require_complete"],
        # a change of either rewrites embeddings.h5 from the shards (no GPU work)
        compression=config["compression"],
        settings=numeric_settings(),
    script:
        "../scripts/aggregate.py"
