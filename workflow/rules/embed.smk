rule embed:
    input:
        index="results/index/sequences.h5",
        residues="results/index/residues.bin",
        plan="results/index/plan.h5",
    output:
        # The declared output is the rank's outcome; the shard itself is written next to it
        # only when complete, so that no failure (and no Snakemake clean-up) can delete it.
        status="results/status/rank_{rank}.json",
    log:
        "logs/embed/rank_{rank}.log",
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
        shard="results/shards/shard_{rank}.h5",
        token=rank_token,
        token_file=lambda wildcards: token_file(wildcards.rank),
        attempts=config["retries"] + 1,
        settings=embed_settings(),
        gpu_lock_dir=config["gpu_lock_dir"],
        work_dir="results/work",
        timeout=config["timeout"],
    script:
        "../scripts/embed.py"
