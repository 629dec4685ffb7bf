rule fasta_list:
    output:
        FASTA_LIST,
    log:
        "logs/fasta_list.log",
    localrule: True
    conda:
        "../envs/esmshard.yaml"
    params:
        files=FASTA_FILES,
    shell:
        "printf '%s\\n' {params.files:q} > {output} 2> {log}"


rule index:
    input:
        fasta=FASTA_FILES,
        fasta_list=FASTA_LIST,
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
