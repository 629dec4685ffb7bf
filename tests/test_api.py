"""The Python entry points, running the real workflow on the tiny model."""

import json
import os
import re
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
import yaml

from conftest import THREADS, planned_ids, random_sequences, write_fasta
from esmshard import api, run_esm2_multi_gpu, run_multi_gpu_inference
from esmshard.reader import load_embeddings

pytestmark = pytest.mark.workflow  # runs the real snakemake: not in make test-fast


@pytest.fixture(autouse=True)
def on_the_cpu(monkeypatch):
    """The CPU, and no injected faults, unless a test says otherwise."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("ESMSHARD_FAIL_RANKS", "")


@pytest.fixture(scope="module")
def records():
    return random_sequences(12, seed=5, median=60, cap=300)


@pytest.fixture(scope="module")
def fasta(tmp_path_factory, records):
    return write_fasta(tmp_path_factory.mktemp("input") / "proteins.fasta", records)


def tiny_config(tiny_checkpoint, **extra):
    return {"model": str(tiny_checkpoint), "threads_per_rank": THREADS, "progress_seconds": 0.5, **extra}


def call(function, *args, env=None, **kwargs):
    """``function(*args, **kwargs)`` on the CPU, with ``env`` added (module fixtures cannot use
    the autouse fixture above)."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {"CUDA_VISIBLE_DEVICES": "", "ESMSHARD_FAIL_RANKS": "", **(env or {})}.items():
            patch.setenv(name, value)
        return function(*args, **kwargs)


def snakemake_calls(log: str) -> list[list[str]]:
    """Each call's part of a snakemake.log: its snakemake commands, each with its output."""
    calls = re.split(r"^===== run_multi_gpu_inference at [0-9: -]+ =====\n", log, flags=re.MULTILINE)
    assert calls[0] == ""  # the log starts with a call's line
    return [("\n" + call).split("\n$ ")[1:] for call in calls[1:]]


def test_model_config_is_checked_against_the_workflow_schema(tmp_path, fasta):
    with pytest.raises(ValueError, match=r"unknown option\(s\) 'modle', 'pooling_x'; the workflow's options are "):
        run_multi_gpu_inference(fasta, tmp_path, {"model": "esm2_t6_8M_UR50D", "modle": 1, "pooling_x": 2})
    with pytest.raises(ValueError, match="model_config must be a dict with at least 'model'"):
        run_multi_gpu_inference(fasta, tmp_path, {"dtype": "float16"})
    with pytest.raises(ValueError, match=r"'world_size' are set through the argument\(s\) world_size"):
        run_multi_gpu_inference(fasta, tmp_path, {"model": "esm2_t6_8M_UR50D", "world_size": 2})
    with pytest.raises(ValueError, match=r"config: dtype: 'float64' is not one of"):
        run_multi_gpu_inference(fasta, tmp_path, {"model": "esm2_t6_8M_UR50D", "dtype": "float64"})
    with pytest.raises(ValueError, match=r"config: world_size: 0 is less than the minimum of 1"):
        run_multi_gpu_inference(fasta, tmp_path, {"model": "esm2_t6_8M_UR50D"}, world_size=0)
    assert not list(tmp_path.iterdir())  # nothing ran


def written_config(tmp_path, fasta, model_config, monkeypatch) -> dict:
    """The config.yaml that a call with ``model_config`` writes (snakemake is not run)."""
    monkeypatch.setattr(api, "_snakemake", lambda *args: (1, "esmshard: ERROR: stopped by the test\n"))
    with pytest.raises(ValueError, match="stopped by the test"):
        run_multi_gpu_inference(fasta, tmp_path, model_config)
    return yaml.safe_load((tmp_path / "config.yaml").read_text())


def test_list_options_may_be_any_sequence(tmp_path, fasta, monkeypatch):
    model_config = {"model": "esm2_t6_8M_UR50D", "layers": np.array([-1, 3]), "pooling": ("mean", "bos")}
    config = written_config(tmp_path, fasta, model_config, monkeypatch)
    assert config["layers"] == [-1, 3] and config["pooling"] == ["mean", "bos"]


def test_a_model_type_other_than_the_files_family_is_a_value_error_before_any_job(tmp_path, fasta, tiny_checkpoint):
    mismatch = {"model_type": "esm1b", "model_name": str(tiny_checkpoint)}
    with pytest.raises(ValueError, match=rf"model_type: 'esm1b', but {tiny_checkpoint} holds an ESM-2 model"):
        run_multi_gpu_inference(fasta, tmp_path, mismatch)
    assert not (tmp_path / "results/index").exists()  # stopped as the workflow was read, before any job


def test_the_original_contracts_model_config_works(tmp_path, fasta, monkeypatch):
    original = {"model_type": "esm2", "model_name": "esm2_t36_3B_UR50D", "token_budget": 4096}
    config = written_config(tmp_path, fasta, original, monkeypatch)
    assert config["model"] == "esm2_t36_3B_UR50D" and config["tokens_per_batch"] == 4096
    assert config["model_type"] == "esm2" and "model_name" not in config and "token_budget" not in config
    with pytest.raises(ValueError, match=r"give 'model' or 'model_name' \(its original name\), not both"):
        run_multi_gpu_inference(fasta, tmp_path, {**original, "model": "esm2_t6_8M_UR50D"})


# What holds an output directory: another call, or a snakemake command run there (its Snakefile
# takes the results folder's lock when it starts its jobs).
HOLDERS = {
    "a call": "from esmshard import api\nwith api._sole_call(Path(sys.argv[1])):\n    print('holding', flush=True)\n"
    "    sys.stdin.read()",
    "a snakemake command": "from esmshard.mainprocess import hold_results\n"
    "hold_results(Path(sys.argv[1]) / 'results')\nprint('holding', flush=True)\nsys.stdin.read()",
}


@pytest.mark.parametrize("holder", sorted(HOLDERS))
def test_a_call_on_a_directory_in_use_changes_nothing_there(tmp_path, fasta, holder):
    out = tmp_path.resolve()
    (out / "config.yaml").write_text("the first run's config\n")
    (out / "logs").mkdir()
    (out / "logs/snakemake.log").write_text("the first run's log\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    first = subprocess.Popen(
        [sys.executable, "-c", f"import sys\nfrom pathlib import Path\n{HOLDERS[holder]}", str(out)],
        env=env,
        text=True,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert first.stdout.readline() == "holding\n"
        in_use = rf"^{re.escape(str(out / 'results'))} is in use by another esmshard run \(pid {first.pid} on "
        with pytest.raises(RuntimeError, match=in_use):
            run_multi_gpu_inference(fasta, out, {"model": "esm2_t6_8M_UR50D"})
    finally:
        first.kill()  # as the first run dying would: the lock goes with its process
        first.wait()
    assert (out / "config.yaml").read_text() == "the first run's config\n"
    assert (out / "logs/snakemake.log").read_text() == "the first run's log\n"
    with api._sole_call(out):  # free again
        pass


def test_bad_input_fails_at_the_index_before_any_embed_job(tmp_path, tiny_checkpoint):
    fasta = tmp_path / "a.fasta"
    fasta.write_text(">x\nMKV\n>y\nMK#V\n")
    out = tmp_path / "out"
    with pytest.raises(ValueError) as error:
        run_multi_gpu_inference(fasta, out, tiny_config(tiny_checkpoint), world_size=2)
    message = str(error.value)
    assert re.search(r"a.fasta: record 2 \('y', line 3\): residue 3 is '#'", message)
    assert f"(snakemake output: {out / 'logs/snakemake.log'})" in message
    assert not (out / "results/status").exists() and not (out / "results/shards").exists()
    assert not (out / "logs/embed").exists()
    assert "rule embed" not in (out / "logs/snakemake.log").read_text()


def test_an_unknown_model_name_is_a_value_error(tmp_path, fasta):
    with pytest.raises(ValueError, match="model: 'esm2_t99_1T_UR50D' is neither an existing checkpoint"):
        run_multi_gpu_inference(fasta, tmp_path, {"model": "esm2_t99_1T_UR50D"})


def test_run_esm2_multi_gpu_runs_the_default_model_with_defaults(tmp_path, fasta, monkeypatch):
    # ESM-2 650M is too big to embed with on this CPU: the default stands in as 8M (random weights
    # of its shape, "downloaded" from a file:// mirror into torch.hub's cache); the rest is real.
    from esmshard.architectures import ESM2_MODELS
    from esmshard.model import write_random_checkpoint

    write_random_checkpoint(tmp_path / "mirror/esm2_t6_8M_UR50D.pt", *ESM2_MODELS["esm2_t6_8M_UR50D"])
    monkeypatch.setenv("ESMSHARD_MODEL_URL", f"file://{tmp_path}/mirror/{{name}}.pt")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert api.DEFAULT_MODEL == "esm2_t33_650M_UR50D"
    monkeypatch.setattr(api, "DEFAULT_MODEL", "esm2_t6_8M_UR50D")
    merged = run_esm2_multi_gpu(fasta, tmp_path / "out", world_size=1)
    config = yaml.safe_load((tmp_path / "out/config.yaml").read_text())
    assert config == {"fasta": [str(fasta)], "model": "esm2_t6_8M_UR50D", "world_size": 1, "timeout": None}
    ids, vectors = load_embeddings(merged)
    assert len(ids) == 12 and vectors.shape == (12, 320) and np.isfinite(vectors).all()
    assert (tmp_path / "torch/hub/checkpoints/esm2_t6_8M_UR50D.pt").is_file()


def test_a_failed_download_is_named_with_its_log_and_cause(tmp_path, fasta, monkeypatch):
    """Offline, the default model cannot be fetched: the error is the download's, not a rank's;
    the workflow's own last words (in the call's snakemake output) say the same."""
    monkeypatch.setenv("ESMSHARD_MODEL_URL", f"file://{tmp_path}/no-mirror/{{name}}.pt")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(api, "DEFAULT_MODEL", "esm2_t6_8M_UR50D")
    with pytest.raises(RuntimeError) as error:
        run_esm2_multi_gpu(fasta, tmp_path / "out", world_size=2)
    cause = "download_model failed: model: cannot download esm2_t6_8M_UR50D from file://"
    assert str(error.value).startswith(f"the esmshard workflow failed: {cause}"), error.value
    assert "(logs/download_model.log)" in str(error.value) and "rank 0" not in str(error.value)
    assert f"esmshard: {cause}" in (tmp_path / "out/logs/snakemake.log").read_text()


@pytest.fixture(scope="module")
def partial_run(tmp_path_factory, fasta, tiny_checkpoint):
    """Rank 1 fails; world_size from two 'visible GPUs' (there are none: the ranks run on the CPU);
    model_config in the original contract's words (model_type, model_name, token_budget).

    Returns what the call returned and what it left, before complete_run calls again."""
    out = tmp_path_factory.mktemp("run")
    config = {
        "model_type": "esm2",
        "model_name": str(tiny_checkpoint),
        "token_budget": 2048,
        **tiny_config(tiny_checkpoint, gpu_lock_dir=str(out / "locks")),
    }
    del config["model"]
    env = {"CUDA_VISIBLE_DEVICES": "0,1", "ESMSHARD_FAIL_RANKS": "1"}
    progress = []
    merged, failed = call(run_multi_gpu_inference, fasta, out, config, env=env, progress=progress.append)
    return {
        "out": out,
        "config": config,
        "merged": merged,
        "failed": failed,
        "ids": load_embeddings(merged)[0],
        "missing": (out / "results/missing_ids.txt").read_text().split(),
        "rank_1": planned_ids(out, 1),
        "log": (out / "logs/snakemake.log").read_text(),
        "rank_1_log": (out / "logs/embed/rank_1.log").read_text(),
        "progress": progress,
    }


@pytest.fixture(scope="module")
def complete_run(partial_run, fasta):
    """The same call again, now without a failing rank: it resumes."""
    out = partial_run["out"]
    merged, failed = call(
        run_multi_gpu_inference, fasta, out, partial_run["config"], env={"CUDA_VISIBLE_DEVICES": "0,1"}
    )
    return out, merged, failed


def test_a_failed_rank_gives_the_others_and_its_number(partial_run, records):
    assert partial_run["merged"] == partial_run["out"] / "results/embeddings.h5" and partial_run["failed"] == [1]
    assert partial_run["missing"] == partial_run["rank_1"] and partial_run["missing"]
    assert partial_run["ids"] == [seq_id for seq_id in records if seq_id not in partial_run["missing"]]
    rank_0_log = (partial_run["out"] / "logs/embed/rank_0.log").read_text()
    assert "batches of at most 2048 tokens" in rank_0_log  # token_budget reached the rank
    assert "failed on its last attempt (2)" in partial_run["rank_1_log"]  # tried once more, as profiles/local


def test_progress_reaches_the_callback_until_the_last_rank_ends(partial_run):
    """Rank 1 fails before it starts computing: only rank 0 reports."""
    final = partial_run["progress"][-1]
    rank_0 = planned_ids(partial_run["out"], 0)
    assert (final.running, final.done, final.sequences, final.total_sequences) == (0, 1, len(rank_0), len(rank_0))
    assert final.residues == final.total_residues > 0 and final.eta_seconds == 0


def test_calling_again_reruns_only_the_failed_rank(complete_run, partial_run):
    out, _, failed = complete_run
    log = (out / "logs/snakemake.log").read_text()
    assert log.startswith(partial_run["log"])  # appended: the first call's log is kept
    _, (_, main_call) = snakemake_calls(log)
    assert re.search(r"^embed\s+1$", main_call, re.MULTILINE) and "wildcards: rank=1" in main_call
    assert failed == []


def test_world_size_defaults_to_the_visible_gpus(complete_run):
    out, _, _ = complete_run
    assert yaml.safe_load((out / "config.yaml").read_text())["world_size"] == 2
    assert json.loads((out / "results/manifest.json").read_text())["world_size"] == 2
    for rank in (0, 1):
        assert planned_ids(out, rank)
        assert re.search(r"\(ESM-2, 2 layers, dim 32\) on cpu", (out / f"logs/embed/rank_{rank}.log").read_text())


def test_the_index_is_built_by_a_call_of_its_own_before_the_embed_jobs(partial_run):
    [(index_call, main_call)] = snakemake_calls(partial_run["log"])
    assert index_call.splitlines()[0].endswith(" ".join(api.INDEX_TARGETS))
    assert "localrule index:" in index_call and "localrule embed:" not in index_call
    assert "localrule embed:" in main_call and "localrule index:" not in main_call


def test_a_complete_run_returns_the_merged_file_as_the_reader_reads_it(complete_run, records):
    out, merged, failed = complete_run
    assert merged == out / "results/embeddings.h5" and failed == []
    ids, vectors = load_embeddings(merged)
    assert ids == list(records) and vectors.shape == (len(records), 32) and np.isfinite(vectors).all()
    some = [ids[7], ids[2]]
    assert np.array_equal(load_embeddings(merged, some)[1], vectors[[7, 2]])
    with h5py.File(merged) as h5:
        assert np.array_equal(h5["mean/layer_2"][:], vectors)
    assert (out / "results/missing_ids.txt").read_text() == ""


def test_a_merged_file_that_fails_its_check_is_a_value_error(tmp_path, complete_run, partial_run, fasta, monkeypatch):
    out, _, _ = complete_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)  # keeps times: snakemake sees nothing to do
    with h5py.File(copy / "results/embeddings.h5", "a") as h5:
        h5["ids"][4], h5["ids"][5] = h5["ids"][5], h5["ids"][4]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    swapped = r"its IDs are not the index's 12 IDs less the 0 missing ones, in input order \(12 IDs, the first "
    with pytest.raises(ValueError, match=r"embeddings.h5 fails its check: " + swapped + r"difference at row 4\)"):
        run_multi_gpu_inference(fasta, copy, partial_run["config"])
    assert "Nothing to be done" in (copy / "logs/snakemake.log").read_text()
    # the check itself, on the call's files (as the call above runs it)
    shutil.copy(out / "results/embeddings.h5", copy / "results/embeddings.h5")
    with h5py.File(copy / "results/embeddings.h5", "a") as h5:
        h5["mean/layer_2"][3, 0] = np.nan
    manifest = json.loads((copy / "results/manifest.json").read_text())
    with pytest.raises(ValueError, match=r"fails its check: mean/layer_2 of 'seq00003' \(row 3\) is not finite"):
        api._check_merged(copy / "results/embeddings.h5", copy, manifest)


def test_run_esm2_multi_gpu_raises_when_a_rank_failed(tmp_path, fasta, tiny_checkpoint, monkeypatch):
    # ESM-2 650M cannot be downloaded here: the tiny model stands in for it, the rest is real.
    monkeypatch.setattr(api, "DEFAULT_MODEL", str(tiny_checkpoint))
    monkeypatch.setenv("ESMSHARD_FAIL_RANKS", "1")
    with pytest.raises(RuntimeError) as error:
        run_esm2_multi_gpu(fasta, tmp_path, world_size=2)
    missing, missing_file = len(planned_ids(tmp_path, 1)), tmp_path / "results/missing_ids.txt"
    assert f"rank(s) 1 failed: {missing} of 12 sequences have no embedding (IDs in {missing_file};" in str(error.value)
    assert (tmp_path / "results/embeddings.h5").exists()


@pytest.fixture(scope="module")
def timed_out(tmp_path_factory, fasta, tiny_checkpoint):
    """Both ranks run past a timeout far shorter than loading the model takes."""
    out = tmp_path_factory.mktemp("timeout")
    with pytest.raises(RuntimeError) as error:
        call(run_multi_gpu_inference, fasta, out, tiny_config(tiny_checkpoint), world_size=2, timeout=0.5)
    return out, str(error.value)


def test_a_rank_over_its_timeout_is_stopped_and_counts_as_failed(timed_out):
    out, _ = timed_out
    for rank in (0, 1):
        status = json.loads((out / f"results/status/rank_{rank}.json").read_text())
        assert not status["ok"] and status["error"] == "TimedOut: rank ran past its time limit"
        assert "ran past its timeout (0.5)" in (out / f"logs/embed/rank_{rank}.log").read_text()
    assert yaml.safe_load((out / "config.yaml").read_text())["timeout"] == 0.5


def test_no_rank_succeeding_is_a_runtime_error_with_each_ranks_error(timed_out):
    out, message = timed_out
    assert message.startswith(
        "no rank succeeded, so there are no embeddings: rank 0: TimedOut: rank ran past its time limit; "
        "rank 1: TimedOut: rank ran past its time limit ("
    )
    assert str(out / "logs/snakemake.log") in message
    assert not (out / "results/embeddings.h5").exists()
