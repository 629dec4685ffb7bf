# Compute nodes are often offline, and N ranks must not download one file N times: a released
# model is downloaded once, where snakemake runs, into torch.hub's cache (where fair-esm keeps
# it too, so a model downloaded before is used as it is). A checkpoint given as a path is the
# user's file: no rule makes it, so none can delete it.
if RELEASED_MODEL:

    rule download_model:
        output:
            checkpoint=MODEL_FILE,
        log:
            "logs/download_model.log",
        localrule: True
        conda:
            "../../environment.yml"
        params:
            model=config["model"],
        script:
            "../scripts/download_model.py"
