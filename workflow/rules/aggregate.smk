rule aggregate:
    input:
        index="results/index/sequences.h5",
        plan="results/index/plan.h5",
        # Every rank ends with a status file, failed or not; the script merges the shards
        # of the ranks whose status says they succeeded.
        statuses=[status_file(rank) for rank in RANKS],
    output:
        embeddings="results/embeddings.h5",
        manifest="results/manifest.json",
        missing="results/missing_ids.txt",
    log:
        "logs/aggregate.log",
    conda:
        "../../environment.yml"
    params:
        require_complete=config["require_complete"],
        token_files=[token_file(rank) for rank in RANKS],
    script:
        "../scripts/aggregate.py"
