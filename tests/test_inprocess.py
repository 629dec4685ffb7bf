"""esmshard.embed and `esmshard embed`: embeddings in the calling process, on the tiny model,
against fair-esm's own forward and against what the workflow writes for the same sequences."""

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import THREADS, completed_run, config_for, fair_esm_outputs, random_sequences, write_fasta
from esmshard import embed
from esmshard.model import load_model

OUTPUTS = {"layers": [-1, 0], "pooling": ["mean", "bos", "per_residue"]}


@pytest.fixture(scope="module")
def records():
    records = random_sequences(20, seed=21, median=90, cap=600)
    records.update(one="M", two="MK", long="".join(random_sequences(1, seed=22, median=1500, cap=1500).values()))
    return records


@pytest.fixture(scope="module")
def windowed(records, tiny_checkpoint):
    """Every output of two layers, long proteins in windows, as embed() returns them."""
    return embed(records, model=tiny_checkpoint, long_sequences="window", **OUTPUTS)


@pytest.fixture(scope="module")
def workflow_run(tmp_path_factory, records, tiny_checkpoint):
    """The same sequences and settings through the whole workflow (two ranks)."""
    out = tmp_path_factory.mktemp("workflow")
    fasta = write_fasta(out / "proteins.fasta", records)
    config = config_for(fasta, tiny_checkpoint, world_size=2, long_sequences="window", **OUTPUTS)
    return completed_run(out, config) / "results/embeddings.h5"


def test_the_result_is_laid_out_like_the_merged_file(windowed, records):
    assert windowed["ids"] == list(records)
    assert windowed["lengths"].tolist() == [len(s) for s in records.values()]
    assert not windowed["truncated"].any()  # windowed, not truncated
    for layer in (0, 2):
        assert windowed[f"mean/layer_{layer}"].shape == (len(records), 32)
        assert windowed[f"mean/layer_{layer}"].dtype == np.float32
        shapes = [rows.shape for rows in windowed[f"per_residue/layer_{layer}"]]
        assert shapes == [(len(s), 32) for s in records.values()]


def test_embed_equals_fair_esms_own_forward(windowed, records, tiny_checkpoint):
    network, alphabet = load_model(str(tiny_checkpoint))
    for i, (seq_id, sequence) in enumerate(records.items()):
        if len(sequence) > 1022:
            continue  # fair-esm has no windows: the workflow comparison below covers them
        for layer in (0, 2):
            expected = fair_esm_outputs(network, alphabet, sequence, layer)
            assert np.abs(windowed[f"mean/layer_{layer}"][i] - expected["mean"]).max() <= 1e-5, seq_id
            assert np.abs(windowed[f"bos/layer_{layer}"][i] - expected["bos"]).max() <= 1e-5, seq_id
            assert np.abs(windowed[f"per_residue/layer_{layer}"][i] - expected["per_residue"]).max() <= 1e-5, seq_id


@pytest.mark.workflow
def test_embed_equals_what_the_workflow_writes(windowed, workflow_run):
    with h5py.File(workflow_run) as h5:
        assert h5["ids"].asstr()[:].tolist() == windowed["ids"]
        offsets = h5["residue_offsets"][:]
        for layer in (0, 2):
            for pooling in ("mean", "bos"):
                name = f"{pooling}/layer_{layer}"
                assert np.abs(h5[name][:] - windowed[name]).max() <= 1e-6, name
            stored = h5[f"per_residue/layer_{layer}"][:]
            for i, rows in enumerate(windowed[f"per_residue/layer_{layer}"]):
                assert np.abs(stored[offsets[i] : offsets[i + 1]] - rows).max() <= 1e-6


@pytest.mark.workflow
def test_the_embed_command_writes_what_the_workflow_writes_then_computes_only_whats_new(
    tmp_path, records, tiny_checkpoint, workflow_run
):
    """`esmshard embed` (one rank in its own process, no Snakemake): the workflow's file, every
    dataset and setting; the same command with one protein more computes that one only."""
    fasta, out = write_fasta(tmp_path / "p.fasta", records), tmp_path / "e.h5"
    command = [Path(sys.executable).parent / "esmshard", "embed", fasta, "-o", out, "-m", tiny_checkpoint]
    command += ["--layers", "-1", "0", "--pooling", *OUTPUTS["pooling"], "--set", "long_sequences=window"]
    command += ["--set", f"threads_per_rank={THREADS}"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    first = subprocess.run(command, capture_output=True, text=True, env=env)
    work = f"{out}.esmshard"
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout == f"wrote {out}: 23 proteins (23 distinct sequences computed, 0 from the store in {work})\n"
    assert "rank 0: 23/23 sequences (100.0%)" in first.stderr  # the rank's progress, on the terminal
    with h5py.File(out) as ours, h5py.File(workflow_run) as theirs:
        assert sorted(ours) == sorted(theirs)
        for key in ("model_digest", "model_family", "settings_key", "layers", "pooling", "dtype", "long_sequences"):
            assert np.array_equal(ours.attrs[key], theirs.attrs[key]), key
        for name in ("ids", "lengths", "truncated", "residue_offsets"):
            assert np.array_equal(ours[name][:], theirs[name][:]), name
        for name in [f"{p}/layer_{layer}" for p in OUTPUTS["pooling"] for layer in (0, 2)]:
            assert np.abs(ours[name][:] - theirs[name][:]).max() <= 1e-6, name
    write_fasta(fasta, {**records, "new": "MKTAYIAKQRQISFVKSHFSRQ"})
    again = subprocess.run(command, capture_output=True, text=True, env=env)
    assert again.stdout == f"wrote {out}: 24 proteins (1 distinct sequences computed, 23 from the store in {work})\n"
    with h5py.File(out) as h5:
        assert h5["ids"].asstr()[:].tolist() == [*records, "new"]


def test_the_embed_command_refuses_bad_input_in_one_line_and_leaves_nothing(tmp_path, tiny_checkpoint):
    fasta = write_fasta(tmp_path / "p.fasta", {"a": "MKV", "b": "MK1V"})
    command = [Path(sys.executable).parent / "esmshard", "embed", fasta, "-o", tmp_path / "e.h5"]
    refused = subprocess.run([*command, "-m", tiny_checkpoint], capture_output=True, text=True)
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr == (
        f"esmshard embed: error: {fasta}: record 2 ('b', line 3): residue 3 is '1', which is not one of the 25 residue "
        "letters (ACDEFGHIKLMNPQRSTVWYXBUZO); fix the input or set 'invalid_residues: replace' to map such "
        "characters to X\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.fasta"]
    options = subprocess.run([*command, "--set", "world_size=2"], capture_output=True, text=True)
    assert options.returncode == 1 and options.stderr == (
        "esmshard embed: error: embed_files: world_size is not an option of a run in this process\n"
    )


def test_a_list_truncation_and_float16(tiny_checkpoint, records):
    sequences = list(records.values())
    result = embed(sequences, model=tiny_checkpoint, dtype="float16", pooling=("per_residue",), device="cpu")
    assert result["ids"] == [str(i) for i in range(len(sequences))]
    assert result["truncated"].tolist() == [len(s) > 1022 for s in sequences]
    per_residue = result["per_residue/layer_2"]
    assert [len(rows) for rows in per_residue] == [min(len(s), 1022) for s in sequences]
    assert all(rows.dtype == np.float16 for rows in per_residue) and "mean/layer_2" not in result
    network, alphabet = load_model(str(tiny_checkpoint))
    long = sequences[-1]
    expected = fair_esm_outputs(network, alphabet, long, 2)["per_residue"]  # its first 1022 residues
    assert np.abs(per_residue[-1].astype(np.float32) - expected).max() <= 2e-3  # float16 rounding


@pytest.mark.parametrize(
    "sequences, options, message",
    [
        (
            {"ok": "MKV", "P1": "MKV#L"},
            {},
            r"^sequences: record 2 \('P1'\): residue 4 is '#', which is not one of "
            r"the 25 residue letters",
        ),
        (["MKV", "MKÉV"], {}, r"^sequences: record 2 \('1'\): residue 3 is 'É'"),
        ({"empty": "*"}, {}, r"^sequences: record 1 \('empty'\): record has no residues$"),
        ("MKV", {}, "not one string"),
        (["MKV"], {"pooling": ["max"]}, r"^config: pooling/0: 'max' is not one of"),
        (["MKV"], {"retries": 2}, r"^embed: unknown option\(s\) 'retries'"),
        (["MKV"], {"device": "cuda:0"}, r"^device: cuda:0, but torch .* finds no CUDA device"),
        (["MKV"], {"engine": "reference", "precision": "bfloat16"}, "reference engine computes in float32 only"),
    ],
)
def test_bad_input_is_a_value_error_before_the_model_loads(sequences, options, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        embed(sequences, model=str(tmp_path / "no-such-checkpoint.pt"), **options)


def test_invalid_residues_replace_and_a_layer_the_model_lacks(tiny_checkpoint):
    replaced = embed({"a": "MKV#L"}, model=tiny_checkpoint, invalid_residues="replace")
    assert np.array_equal(replaced["mean/layer_2"], embed({"a": "MKVXL"}, model=tiny_checkpoint)["mean/layer_2"])
    with pytest.raises(ValueError, match=r"^config: layer 7 is outside this model's layers 0..2"):
        embed(["MKV"], model=tiny_checkpoint, layers=[7])


@pytest.mark.parametrize("engine", ["packed", "reference"])
def test_a_budget_under_a_proteins_windows_gives_the_same_vectors(tiny_checkpoint, engine):
    """tokens_per_batch 2048 spreads a 4,000-residue protein's windows over batches (2 per batch)."""
    sequences = list(random_sequences(6, seed=23, median=200, cap=600).values())
    sequences.insert(2, "".join(random_sequences(1, seed=24, median=4000, cap=4000).values()))
    options = dict(model=tiny_checkpoint, long_sequences="window", window_overlap=700, engine=engine, **OUTPUTS)
    small = embed(sequences, tokens_per_batch=2048, **options)
    large = embed(sequences, tokens_per_batch=10**6, **options)
    for name in ("mean/layer_0", "mean/layer_2", "bos/layer_0", "bos/layer_2"):
        assert np.abs(small[name] - large[name]).max() <= 1e-5, name
    for name in ("per_residue/layer_0", "per_residue/layer_2"):
        assert all(np.abs(a - b).max() <= 1e-5 for a, b in zip(small[name], large[name])), name
