rule plan:
    input:
        index=rules.index.output.index,
        checkpoint=MODEL_FILES,
    output:
        plan=paths.PLAN,
    log:
        "logs/plan.log",
    conda:
        "../envs/esmshard.yaml"
    params:
        world_size=WORLD_SIZE,
        settings=numeric_settings(),
    script:
        "../scripts/plan.py"
