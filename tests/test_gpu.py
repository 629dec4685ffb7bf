import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from esmshard import gpu


@pytest.mark.parametrize(
    "env, expected",
    [("0,1,2", ["0", "1", "2"]), ("", []), ("3", ["3"]), ("1,-1,2", ["1"]), ("GPU-abc, GPU-def", ["GPU-abc", "GPU-def"])],
)
def test_visible_gpus_honours_cuda_visible_devices(monkeypatch, env, expected):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", env)
    assert gpu.visible_gpus() == expected


def test_no_gpu_means_cpu(monkeypatch, tmp_path):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert gpu.pin_gpu(tmp_path).gpu is None


def test_inside_slurm_the_allocation_is_kept(monkeypatch, tmp_path):
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    lease = gpu.pin_gpu(tmp_path)
    assert lease.gpu == "3" and os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    assert not list(tmp_path.iterdir())  # no lock taken


HOLDER = textwrap.dedent(
    """
    import logging, os, sys, time
    from esmshard.gpu import pin_gpu
    logging.basicConfig(level=logging.INFO)
    lease = pin_gpu(sys.argv[1], poll_seconds=0.1)
    print(os.environ["CUDA_VISIBLE_DEVICES"], flush=True)
    time.sleep(float(sys.argv[2]))
    """
)


def start(script, *args, visible="0,1"):
    """A python process running script with CUDA_VISIBLE_DEVICES=visible."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": visible, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("SLURM_JOB_ID", None)
    command = [sys.executable, "-c", script, *map(str, args)]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def start_holder(lock_dir, seconds, visible="0,1"):
    """A process that leases a GPU, prints it, and holds it for seconds."""
    return start(HOLDER, lock_dir, seconds, visible=visible)


def test_processes_never_share_a_gpu_and_wait_when_all_are_leased(tmp_path):
    first = start_holder(tmp_path, 3)
    second = start_holder(tmp_path, 3)
    pinned = {first.stdout.readline().strip(), second.stdout.readline().strip()}
    assert pinned == {"0", "1"}
    started = time.monotonic()
    third = start_holder(tmp_path, 0)  # more ranks than GPUs: waits for a lease to end
    third_gpu = third.stdout.readline().strip()
    waited = time.monotonic() - started
    for process in (first, second, third):
        process.wait(timeout=30)
    assert third_gpu in {"0", "1"}
    assert waited > 1.5


def test_a_killed_holder_frees_its_gpu(tmp_path):
    holder = start_holder(tmp_path, 60, visible="7")
    assert holder.stdout.readline().strip() == "7"
    holder.kill()
    holder.wait()
    nxt = start_holder(tmp_path, 0, visible="7")
    assert nxt.stdout.readline().strip() == "7"
    nxt.wait(timeout=30)


WAITER = textwrap.dedent(
    """
    import logging, os, signal, sys
    from esmshard.gpu import pin_gpu

    class Stopped(Exception):
        pass

    def stop(signum, frame):
        raise Stopped(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, stop)
    logging.basicConfig(level=logging.INFO)
    try:
        pin_gpu(sys.argv[1], poll_seconds=0.1)
    except Stopped:
        open_files = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                open_files.append(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:  # the descriptor listdir used
                pass
        print([f for f in open_files if f.endswith(".lock")], flush=True)
        raise
    """
)


def test_a_stop_signal_ends_the_wait_and_leaves_no_lock_held(tmp_path):
    holder = start_holder(tmp_path, 60, visible="5")
    try:
        assert holder.stdout.readline().strip() == "5"
        waiter = start(WAITER, tmp_path, visible="5")
        assert "waiting for one" in waiter.stderr.readline()
        waiter.send_signal(signal.SIGTERM)
        out, err = waiter.communicate(timeout=30)
    finally:
        holder.kill()
        holder.wait()
    assert waiter.returncode == 1 and err.strip().endswith("Stopped: SIGTERM")
    assert out.strip() == "[]"  # no lock file left open, so no flock held

