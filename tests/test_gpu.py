import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from esmshard import EsmShardError, gpu


@pytest.mark.parametrize(
    "env, expected",
    [
        ("0,1,2", ["0", "1", "2"]),
        ("", []),
        ("3", ["3"]),
        ("1,-1,2", ["1"]),
        ("GPU-abc, GPU-def", ["GPU-abc", "GPU-def"]),
    ],
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
    import gc, logging, os, sys, time
    from esmshard.gpu import pin_gpu
    logging.basicConfig(level=logging.INFO)
    pin_gpu(sys.argv[1], poll_seconds=0.1)  # as a rank does: the lease object is not kept
    gc.collect()
    print(os.environ["CUDA_VISIBLE_DEVICES"], flush=True)
    time.sleep(float(sys.argv[2]))
    """
)


@dataclass
class User:
    """Another Unix user to run processes as, with a python and a copy of esmshard it can read."""

    uid: int
    gid: int
    python: str
    pythonpath: str

    def command(self, script, *args):
        ids = [f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups"]
        return ["setpriv", *ids, self.python, "-c", script, *map(str, args)]


def start(script, *args, visible="0,1", user=None):
    """A python process running script with CUDA_VISIBLE_DEVICES=visible, as user when given."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": visible, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("SLURM_JOB_ID", None)
    command = [sys.executable, "-c", script, *map(str, args)]
    if user is not None:
        command = user.command(script, *args)
        env.update(PYTHONPATH=user.pythonpath, HOME="/", PYTHONDONTWRITEBYTECODE="1")
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def start_holder(lock_dir, seconds, visible="0,1", user=None):
    """A process that leases a GPU, prints it, and holds it for seconds."""
    return start(HOLDER, lock_dir, seconds, visible=visible, user=user)


def _add_user(name) -> bool:
    """Create a system user unless it exists; return whether this created it."""
    try:
        pwd.getpwnam(name)
        return False
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--user-group", name], check=True)
        return True


@pytest.fixture(scope="module")
def other_users():
    """Two Unix users other than root (created here, removed after), whose processes can import
    a copy of esmshard (this checkout and its python may be private to root)."""
    if os.geteuid() != 0 or not (shutil.which("setpriv") and shutil.which("useradd")):
        pytest.skip("needs root (to create Unix users), setpriv and useradd")
    names = ["esmshard-test-a", "esmshard-test-b"]
    created = [name for name in names if _add_user(name)]
    shared = Path(tempfile.mkdtemp(prefix="esmshard-test-pkg-"))
    try:
        shared.chmod(0o755)
        package = Path(gpu.__file__).parent
        shutil.copytree(package, shared / "esmshard", ignore=shutil.ignore_patterns("__pycache__"))
        for python in (sys.executable, "/usr/bin/python3"):  # the first may be in root's private home
            users = [User(pwd.getpwnam(n).pw_uid, pwd.getpwnam(n).pw_gid, python, str(shared)) for n in names]
            if start("import esmshard.gpu", user=users[0]).wait(timeout=60) == 0:
                break
        else:
            pytest.skip("no python that the other users can run")
        yield users
    finally:
        shutil.rmtree(shared)
        for name in created:
            subprocess.run(["userdel", name], check=True)


@pytest.fixture
def shared_tmp():
    """A directory that every user can reach and write, unlike tmp_path (private to this user)."""
    path = Path(tempfile.mkdtemp(prefix="esmshard-test-"))
    path.chmod(0o1777)
    yield path
    for sub in [path, *path.rglob("*")]:
        if sub.is_dir():
            sub.chmod(0o777)  # a test may have made it read-only
    shutil.rmtree(path)


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


def test_two_users_never_share_a_gpu(other_users, shared_tmp):
    a, b = other_users
    locks = shared_tmp / "locks"
    holder = start_holder(locks, 60, user=a)
    try:
        assert holder.stdout.readline().strip() == "0"
        assert stat.S_IMODE(locks.stat().st_mode) == 0o1777
        files = {p.name: (stat.S_IMODE(p.stat().st_mode), p.stat().st_uid) for p in locks.iterdir()}
        assert files == {"gpu-0.lock": (0o666, a.uid), "gpu-1.lock": (0o666, a.uid)}
        other = start_holder(locks, 0, user=b)
        assert other.stdout.readline().strip() == "1"
        assert other.wait(timeout=30) == 0
    finally:
        holder.kill()
        holder.wait()


def test_with_one_gpu_the_other_user_waits_for_it(other_users, shared_tmp):
    a, b = other_users
    holder = start_holder(shared_tmp / "locks", 60, visible="0", user=a)
    try:
        assert holder.stdout.readline().strip() == "0"
        waiter = start_holder(shared_tmp / "locks", 0, visible="0", user=b)
        assert "waiting for one" in waiter.stderr.readline()
    finally:
        holder.kill()
        holder.wait()
    assert waiter.stdout.readline().strip() == "0"
    assert waiter.wait(timeout=30) == 0


def test_lock_files_the_user_cannot_write_still_work(other_users, shared_tmp):
    """A directory and lock files of user a, left as an older esmshard made them (0755, 0644)."""
    a, b = other_users
    locks = shared_tmp / "locks"
    locks.mkdir()
    for path, mode in ((locks, 0o755), (locks / "gpu-0.lock", 0o644), (locks / "gpu-1.lock", 0o644)):
        path.touch(exist_ok=True)
        path.chmod(mode)
        os.chown(path, a.uid, a.gid)
    holder = start_holder(locks, 60, user=b)  # b opens a's files read-only
    try:
        assert holder.stdout.readline().strip() == "0"
        other = start_holder(locks, 0, user=a)
        assert other.stdout.readline().strip() == "1"
        assert other.wait(timeout=30) == 0
    finally:
        holder.kill()
        holder.wait()


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


ADVICE = "; set gpu_lock_dir in the config to a directory that every user running esmshard on this host can write"


def pin_error(lock_dir, monkeypatch) -> str:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(EsmShardError) as error:
        gpu.pin_gpu(lock_dir)
    return str(error.value)


def pin_error_without_write_permission(directory, lock_dir, monkeypatch, request) -> str:
    """pin_gpu(lock_dir)'s error for a user who cannot write directory: this user with the
    directory read-only, or, as root may write anywhere, another user."""
    if os.geteuid() != 0:
        directory.chmod(0o555)
        return pin_error(lock_dir, monkeypatch)
    directory.chmod(0o755)
    process = start_holder(lock_dir, 0, visible="0", user=request.getfixturevalue("other_users")[0])
    _, err = process.communicate(timeout=30)
    last = err.strip().splitlines()[-1]
    assert process.returncode == 1 and last.startswith("esmshard.EsmShardError: ")
    return last.removeprefix("esmshard.EsmShardError: ")


def test_a_lock_dir_that_is_a_file(tmp_path, monkeypatch):
    (tmp_path / "locks").write_text("")
    message = pin_error(tmp_path / "locks", monkeypatch)
    assert message == f"gpu_lock_dir {tmp_path}/locks: is not a directory{ADVICE}"


def test_a_lock_dir_whose_parent_cannot_be_created(shared_tmp, monkeypatch, request):
    directory = shared_tmp / "readonly"
    directory.mkdir()
    message = pin_error_without_write_permission(directory, directory / "sub" / "locks", monkeypatch, request)
    expected = f"gpu_lock_dir {directory}/sub/locks: cannot create it: Permission denied ({directory}/sub)"
    assert message == expected + ADVICE


def test_a_lock_dir_the_user_cannot_write_and_without_lock_files(shared_tmp, monkeypatch, request):
    locks = shared_tmp / "locks"
    locks.mkdir()
    (locks / "gpu-1.lock").touch()  # another GPU's: no help
    message = pin_error_without_write_permission(locks, locks, monkeypatch, request)
    user = "esmshard-test-a" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
    problem = f"has no gpu-0.lock and user {user} may not create files in it"
    assert message == f"gpu_lock_dir {locks}: {problem}{ADVICE}"
