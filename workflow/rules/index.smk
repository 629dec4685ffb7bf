rule index:
    output:
        index="results/index/sequences.h5",
        residues="results/index/residues.bin",
        plan="results/index/plan.h5",
    log:
        "logs/index.log",
    conda:
        "../../environment.yml"
    params:
        fasta=config["fasta"],
        invalid_residues=config["invalid_residues"],
        model=config["model"],
        long_sequences=config["long_sequences"],
        window_overlap=config["window_overlap"],
        world_size=WORLD_SIZE,
    script:
        "../scripts/index.py"
