rule index:
    input:
        fasta=FASTA_FILES,
    output:
        index="results/index/sequences.h5",
        residues="results/index/residues.bin",
    log:
        "logs/index.log",
    conda:
        "../../environment.yml"
    params:
        invalid_residues=config["invalid_residues"],
    script:
        "../scripts/index.py"
