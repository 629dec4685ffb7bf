"""Command-line tools: ``esmshard`` once installed, or ``python -m esmshard``.

esmshard --version
esmshard embed FASTA... -o OUT.h5 [--model M] [--layers L...] [--pooling P...] [--set OPTION=VALUE ...]
esmshard run FASTA... -o OUT_DIR [--model M] [--world-size N] [--timeout T] [--set OPTION=VALUE ...]
python -m esmshard random-checkpoint PATH [--like esm2_t33_650M_UR50D]
python -m esmshard export results/embeddings.h5 OUT_DIR [--format npy|pt]
python -m esmshard export results/embeddings.h5 OUT.h5 --format per-id [--pooling mean] [--layer L]
python -m esmshard export results/embeddings.h5 OUT.tsv --format tsv [--pooling mean] [--layer L]
python -m esmshard download esm2_t33_650M_UR50D|facebook/esm2_t33_650M_UR50D [DIR]
python -m esmshard options   (the table of config options in config/README.md, from the schema)
"""

import argparse
from pathlib import Path

from esmshard import EsmShardError, __version__, paths
from esmshard.architectures import ESMC_MODELS, FAMILIES, RELEASED_MODELS, RELEASED_SHAPES, release_family


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="esmshard")
    parser.add_argument("--version", action="version", version=f"esmshard {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    embed = commands.add_parser(
        "embed",
        help="embed FASTA files in this process, on one GPU (or the CPU), into one HDF5 file (the same command "
        "again resumes from its store, computing only what is missing or changed); no Snakemake needed",
    )
    embed.add_argument("-o", "--output", required=True, help="the HDF5 file to write, laid out as embeddings.h5")
    embed.add_argument("--layers", type=int, nargs="+", help="layers to store (default: the last; -1 counts from it)")
    embed.add_argument(
        "--pooling", nargs="+", choices=["mean", "bos", "per_residue"], help="what to store (default: mean)"
    )
    embed.add_argument(
        "--work-dir", help=f"the index, plan and store (default: the output's path + {paths.EMBED_WORK_SUFFIX})"
    )
    run = commands.add_parser(
        "run",
        help="embed FASTA files with the whole workflow (Snakemake), one rank per visible GPU (the same "
        "command again resumes, and redoes only what is missing or changed)",
    )
    run.add_argument("-o", "--output-dir", required=True, help="the run's folder: results/embeddings.h5 and logs")
    run.add_argument("--world-size", type=int, help="ranks (default: one per visible GPU, 1 without)")
    run.add_argument("--timeout", help="time limit of each rank, e.g. 90m or 11h30m")
    for command in (embed, run):
        command.add_argument("fasta", nargs="+", help="FASTA files or globs (plain, gzip, bzip2 or xz)")
        command.add_argument("-m", "--model", default="esm2_t33_650M_UR50D", help="as the config's 'model' option")
        command.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="OPTION=VALUE",
            help="any other config option, the value in YAML (e.g. --set dtype=float16); esmshard options lists them",
        )
    random = commands.add_parser(
        "random-checkpoint",
        help="write an ESM-2 or ESM-1b checkpoint with RANDOM weights (real architecture) in fair-esm's format",
    )
    random.add_argument("path")
    random.add_argument("--like", choices=sorted(RELEASED_SHAPES), help="copy the family and shape of a released model")
    random.add_argument(
        "--family", choices=["esm1b", "esm2", "esmc"], default="esm2", help="without --like (default: esm2)"
    )
    random.add_argument("--layers", type=int, default=2)
    random.add_argument("--embed-dim", type=int, default=32)
    random.add_argument("--heads", type=int, default=4)
    random.add_argument("--seed", type=int, default=0)
    export = commands.add_parser(
        "export",
        help="embeddings.h5 to .npy files + ids.txt, to extract.py's .pt files, to one HDF5 dataset per ID, "
        "or to a table (TSV) of one pooled output",
    )
    export.add_argument("embeddings")
    export.add_argument("out_dir", metavar="out", help="a directory (npy, pt), an .h5 file (per-id) or a file (tsv)")
    export.add_argument("--format", choices=["npy", "pt", "per-id", "tsv"], default="npy")
    export.add_argument("--pooling", default="mean", help="per-id, tsv: the output to export (default: mean)")
    export.add_argument("--layer", type=int, help="per-id, tsv: the layer (default: the last the file holds)")
    download = commands.add_parser(
        "download",
        help="download a released model or a Hugging Face hub id (for clusters whose nodes are "
        "offline), checked before it lands",
    )
    download.add_argument(
        "model", help=f"a released name ({', '.join([*RELEASED_MODELS, *ESMC_MODELS])}) or a hub id (org/name)"
    )
    download.add_argument(
        "dir",
        nargs="?",
        help="where to put it (default: torch.hub's cache for a released model, "
        "the Hugging Face cache for a hub id: where the workflow looks)",
    )
    commands.add_parser("options", help="print every config option, its default and meaning (from the schema)")
    args = parser.parse_args(argv)

    if args.command in ("embed", "run"):
        status, words = (_embed if args.command == "embed" else _run)(args)
        if status:
            parser.exit(status, words)
        print(words)
        return

    if args.command == "options":
        from esmshard.settings import options_table

        print(options_table(), end="")
        return

    if args.command == "export":
        try:
            print(_export(args))
        except (EsmShardError, OSError, KeyError, ValueError) as error:  # its one-line message, no traceback
            message = error.args[0] if isinstance(error, KeyError) else error  # str() of a KeyError quotes it
            parser.exit(1, f"{parser.prog} export: error: {message}\n")
        return

    if args.command == "download":
        from esmshard.model import download

        released = args.model in RELEASED_MODELS
        target = (Path(args.dir) / f"{args.model}.pt" if released else Path(args.dir)) if args.dir else None
        try:
            path = download(args.model, target)
        except (EsmShardError, OSError) as error:
            parser.exit(1, f"{parser.prog} download: error: {error}\n")
        where = f"set 'model' to {path}" if args.dir else f"'model: {args.model}' finds it there (also offline)"
        print(f"wrote {path}: {where}")
        return

    from esmshard.model import write_random_checkpoint

    layers, dim, heads = RELEASED_SHAPES[args.like] if args.like else (args.layers, args.embed_dim, args.heads)
    family = release_family(args.like) if args.like else args.family
    if family == "esmc" and (dim % 64 or heads != dim // 64):
        parser.exit(
            2,
            f"{parser.prog} random-checkpoint: error: ESM C's heads are 64 wide: give --embed-dim a multiple "
            f"of 64 and --heads it / 64\n",
        )
    path = write_random_checkpoint(args.path, layers, dim, heads, args.seed, family=family)
    print(
        f"wrote {path}: {FAMILIES[family]} architecture ({layers} layers, dim {dim}, {heads} heads) with RANDOM weights"
    )


def _options(args) -> dict:
    """The config options that --model and each --set give; ValueError for a --set without '='."""
    import yaml

    config = {"model": args.model}
    for setting in args.set:
        option, equals, value = setting.partition("=")
        if not equals or not option:
            raise ValueError(f"--set {setting!r}: give OPTION=VALUE")
        config[option.strip()] = yaml.safe_load(value)
    return config


def _embed(args) -> tuple[int, str]:
    """(exit status, last words): 0 with every protein embedded, 1 with an error or a stop signal
    (the finished work kept for the same command again)."""
    from esmshard import logs
    from esmshard.inprocess import default_work_dir, embed_files
    from esmshard.stopping import Stopped, handle_stop_signals

    output = Path(args.output)
    work = Path(args.work_dir or default_work_dir(output))
    try:
        options = {**_options(args), "layers": args.layers, "pooling": args.pooling}
        logs.setup_terminal()
        handle_stop_signals()  # SIGTERM, as Ctrl-C, stops the rank with its finished work saved
        manifest = embed_files(args.fasta, output, work_dir=work, **options)
    except (EsmShardError, ValueError, OSError, Stopped) as error:
        words = "stopped" if isinstance(error, Stopped) else f"error: {error}"
        if (work / "results" / "store").is_dir():
            words += f"; finished work is kept in {work}, and the same command again resumes"
        return 1, f"esmshard embed: {words}\n"
    return 0, (
        f"wrote {output}: {manifest['embedded']} proteins ({manifest['computed']} distinct sequences computed, "
        f"{manifest['reused']} from the store in {work})"
    )


def _run(args) -> tuple[int, str]:
    """(exit status, last words): 0 with every protein embedded, 2 with a partial result (the
    failed ranks named; the same command again retries them), 1 with an error and no result."""
    import sys

    from esmshard.api import run_multi_gpu_inference

    try:
        config = _options(args)
    except ValueError as error:
        return 1, f"esmshard run: error: {error}\n"

    def show(overall) -> None:
        print(overall.line(), file=sys.stderr, flush=True)

    try:
        merged, failed = run_multi_gpu_inference(
            args.fasta, args.output_dir, config, args.world_size, args.timeout, progress=show
        )
    except (RuntimeError, ValueError, OSError) as error:
        return 1, f"esmshard run: error: {error}\n"
    if failed:
        missing = Path(args.output_dir, paths.MISSING_IDS)
        return 2, (
            f"wrote {merged} without the proteins of rank(s) {', '.join(map(str, failed))} (listed in {missing}); "
            f"the same command again retries them\n"
        )
    return 0, f"wrote {merged}"


def _export(args) -> str:
    from esmshard.reader import export_npy, export_per_id, export_pt, export_tsv

    if args.format == "npy":
        return "wrote " + ", ".join(str(path) for path in export_npy(args.embeddings, args.out_dir))
    if args.format == "tsv":
        count = export_tsv(args.embeddings, args.out_dir, args.pooling, args.layer)
        return f"wrote {args.out_dir}: one row per protein, {count} proteins"
    if args.format == "per-id":
        count = export_per_id(args.embeddings, args.out_dir, args.pooling, args.layer)
        return f"wrote {args.out_dir}: one dataset per ID, {count} proteins"
    return f"wrote {export_pt(args.embeddings, args.out_dir)} .pt files to {args.out_dir}"


if __name__ == "__main__":
    main()
