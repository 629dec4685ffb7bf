rule index:
    input:
        fasta=FASTA_FILES,
    output:
        index=paths.INDEX,
        residues=paths.RESIDUES,
    log:
        "logs/index.log",
    conda:
        "../envs/esmshard.yaml"
    params:
        invalid_residues=config["invalid_residues"],
    script:
        "../scripts/index.py"
