"""esmshard's FASTA reader against Biopython's SimpleFastaParser under the same validation.

    pip install biopython==1.88   # not an esmshard dependency (this measurement is why)
    python bench/fasta_readers.py [FASTA ...] [--synthetic 200000] [--repeat 5]

Both read the whole file and apply esmshard's checks to every record (ID, residues, stop codon,
alphabet); esmshard's reader also gives what the index and its error messages need and
Biopython's parser does not (byte offsets and line numbers of records, lone \\r line ends).
Prints the best CPU time of --repeat runs per file (CPU, not wall time: other load on the
machine counts less) as a table.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from Bio.SeqIO.FastaIO import SimpleFastaParser

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "workflow" / "scripts"))
from esmshard.fasta import _finish, _parse_id, read_fasta  # noqa: E402


def esmshard_reader(path: Path) -> int:
    return sum(len(record.residues) for record in read_fasta(path))


def biopython_reader(path: Path) -> int:
    """SimpleFastaParser's (title, sequence) pairs through esmshard's per-record checks."""
    residues = 0
    with open(path, encoding="utf-8") as handle:
        for number, (title, sequence) in enumerate(SimpleFastaParser(handle), start=1):
            header = (_parse_id(path, b">" + title.encode(), number, 0), 0, number, 0)
            residues += len(_finish(path, header, [sequence.encode()], "error").residues)
    return residues


def synthetic_fasta(path: Path, n: int) -> Path:
    """``n`` proteins of log-normal lengths (median 300), 60 residues a line."""
    rng = np.random.default_rng(0)
    letters = np.frombuffer(b"ACDEFGHIKLMNPQRSTVWY", np.uint8)
    with open(path, "w") as out:
        for i, length in enumerate(np.clip(rng.lognormal(np.log(300), 0.6, n).astype(int), 20, 5000)):
            sequence = letters[rng.integers(0, 20, length)].tobytes().decode()
            out.write(f">protein{i} synthetic\n")
            out.writelines(sequence[j : j + 60] + "\n" for j in range(0, length, 60))
    return path


def best_seconds(reader, path: Path, repeat: int) -> tuple[float, int]:
    times, residues = [], 0
    for _ in range(repeat):
        started = time.process_time()
        residues = reader(path)
        times.append(time.process_time() - started)
    return min(times), residues


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("fasta", nargs="*", type=Path)
    parser.add_argument("--synthetic", type=int, default=200_000, help="records of a generated file (0: none)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        files = list(args.fasta)
        if args.synthetic:
            files.append(synthetic_fasta(Path(tmp) / f"synthetic_{args.synthetic}.fasta", args.synthetic))
        print(f"{'file':<28} {'MB':>7} {'esmshard cpu s':>15} {'biopython cpu s':>16} {'biopython/esmshard':>19}")
        for path in files:
            ours, residues = best_seconds(esmshard_reader, path, args.repeat)
            theirs, same = best_seconds(biopython_reader, path, args.repeat)
            assert same == residues, f"{path}: the readers disagree ({residues} vs {same} residues)"
            print(
                f"{path.name:<28} {path.stat().st_size / 1e6:>7.1f} {ours:>15.3f} {theirs:>16.3f} "
                f"{theirs / ours:>18.2f}x"
            )


if __name__ == "__main__":
    main()
