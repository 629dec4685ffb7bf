rule index:
    input:
        fasta=FASTA_FILES,
    output:
        index=paths.INDEX,
        residues=paths.RESIDUES,
    log:
        "logs/index.log",
    conda:
        "../../environment.yml"
    params:
        invalid_residues=config["invalid_residues"],
    script:
        "../scripts/index.py"
