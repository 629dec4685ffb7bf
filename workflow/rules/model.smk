# Compute nodes are often offline, and N ranks must not download one file N times: a model named
# by a released name or a hub id is downloaded once, where snakemake runs, into the cache where
# fair-esm (torch.hub) or transformers (the Hugging Face cache) keep it, so a model downloaded
# before is used as it is. The rule exists only while the model is missing: what is in a cache, or
# given as a path, is the user's, and no rule makes it, so none can delete it.
if DOWNLOAD_MODEL:

    rule download_model:
        output:
            model=MODEL_FILES[0],
        log:
            "logs/download_model.log",
        localrule: True
        conda:
            "../envs/esmshard.yaml"
        params:
            model=config["model"],
        script:
            "../scripts/download_model.py"
