import hashlib
import os
import sys
from pathlib import Path

from snakemake.sourcecache import LocalGitFile, SourceFile


def package_root(rules):
    """The folder that holds this workflow's scripts/esmshard and schemas (``rules``: this file's
    folder): the checkout itself, or, for a module deployed from git (github(), gitlab(),
    gitfile()), a copy of exactly those files of its tag under .snakemake/esmshard/, read through
    Snakemake's source cache (package.txt lists them)."""
    try:
        return Path(rules).parent
    except TypeError:  # a remote source
        basedir = rules.get_basedir()
    uri = basedir.get_path_or_uri(secret_free=True)
    root = (
        Path(".snakemake/esmshard").resolve()
        / hashlib.sha256(uri.encode()).hexdigest()[:16]
    )
    with workflow.sourcecache.open(basedir.join("package.txt")) as listing:
        names = [
            line
            for line in listing.read().splitlines()
            if line and not line.startswith("#")
        ]
    for name in names:
        with workflow.sourcecache.open(basedir.join(name), "rb") as source:
            content = source.read()
        path = root / name
        if not path.is_file() or path.read_bytes() != content:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f".{path.name}.{os.getpid()}")
            partial.write_bytes(content)
            partial.replace(path)
    return root


def join_any_path(join):
    """LocalGitFile.join (gitfile()) taking a path as a source file too: Snakemake 9.27 hands it
    one for a rule's script (jobs.py, _path_to_source_file) and then fails with "expected str
    instance, LocalSourceFile found", so that a module from a local git repository (an offline
    deployment) cannot plan a job. github() and gitlab() join either already."""

    def joined(self, path):
        return join(
            self,
            (
                path.get_path_or_uri(secret_free=True)
                if isinstance(path, SourceFile)
                else path
            ),
        )

    joined.__wrapped__ = join
    return joined


if not hasattr(LocalGitFile.join, "__wrapped__"):
    LocalGitFile.join = join_any_path(LocalGitFile.join)


# The package for this process, and for every job (rule scripts put ESMSHARD_PACKAGE first on
# their sys.path): the workflow's own, never one installed elsewhere.
os.environ["ESMSHARD_PACKAGE"] = str(package_root(workflow.current_basedir) / "scripts")
sys.path.insert(0, os.environ["ESMSHARD_PACKAGE"])


envvars:
    "ESMSHARD_PACKAGE",
