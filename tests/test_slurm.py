"""The sweep on a real SLURM cluster (slurmctld, slurmd, slurmdbd on this machine, started by .ci/slurm.sh): the
basic launcher's table, resubmission, a cancelled task, a task at its time limit, nothing computed by the launching
process. docs/cluster.md has the fault table these tests stand behind."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
from test_sweep import REQUIRED_COLUMNS, read_table, run_sweep, tiny_args

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / ".ci" / "slurm.sh"
# One CPU and 1 GB per task: the node (this machine) runs two at once. The generation check is off except where a
# test is about it (it is one more task).
SLURM = ["hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1",
         "metrics.generate=false"]
NUMBERS = REQUIRED_COLUMNS + ["delta_nll", "sqnr_db", "n_changed"]
USR2 = 1 << (signal.SIGUSR2 - 1)  # its bit in /proc/<pid>/status's signal masks


@pytest.fixture(scope="session")
def slurm():
    """A real single-node SLURM for the session, started and stopped by the project's script. Without SLURM's
    packages this fails with the script's line naming the apt-get command (CI installs them)."""
    # not under pytest's tmp (private to root): munged runs as the munge user and must reach its directory
    directory = Path(tempfile.mkdtemp(prefix="sweep-slurm-", dir="/tmp"))
    directory.chmod(0o755)
    env = {**os.environ, "SWEEP_SLURM_PORT": os.environ.get("SWEEP_SLURM_PORT", "16917")}
    start = subprocess.run(["bash", str(SCRIPT), "start", str(directory)], env=env, capture_output=True, text=True,
                           timeout=180)
    if start.returncode != 0:
        pytest.fail(f"{SCRIPT.name} start failed: {start.stderr.strip() or start.stdout.strip()}", pytrace=False)
    yield {"SLURM_CONF": str(directory / "slurm.conf"), "SWEEP_SLURM_PORT": env["SWEEP_SLURM_PORT"],
           "SWEEP_SLURM_DIR": str(directory)}
    subprocess.run(["bash", str(SCRIPT), "stop", str(directory)], env=env, timeout=120, check=True)
    shutil.rmtree(directory)


@pytest.fixture
def cluster_env(env, slurm):
    return {**env, **slurm}


def task_logs(sweep_dir: Path) -> str:
    return "".join(p.read_text() for p in sorted((sweep_dir / ".submitit").glob("*/*_log.*")))


def stored_points(store: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (store / "points").glob("*.json")}


def task_process(sweep_dir: Path, task: int, timeout: float = 120) -> tuple[int, str]:
    """(pid, SLURM job id) of the Python process running task `task` of this sweep (on this node). submitit
    submits one task as a plain job and several as an array (`<array id>_<task>`)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                if not (os.path.basename(cmd[0]).startswith(b"python") and b"submitit.core._submit" in cmd
                        and any(str(sweep_dir).encode() in c for c in cmd)):
                    continue
                environ = dict(v.split(b"=", 1) for v in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                               if b"=" in v)
            except (OSError, IndexError):
                continue  # gone meanwhile
            if b"SLURM_ARRAY_TASK_ID" not in environ and task == 0:
                return int(pid), environ[b"SLURM_JOB_ID"].decode()
            if environ.get(b"SLURM_ARRAY_TASK_ID") == str(task).encode():
                return int(pid), f"{environ[b'SLURM_ARRAY_JOB_ID'].decode()}_{task}"
        time.sleep(0.1)
    raise AssertionError(f"array task {task} of {sweep_dir} never started")


def signal_masks(pid: int) -> dict[str, int]:
    """/proc/<pid>/status's signal masks: SigPnd, ShdPnd (pending), SigCgt (caught by a handler), ..."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {k: int(fields[k], 16) for k in ("SigPnd", "ShdPnd", "SigBlk", "SigIgn", "SigCgt")}


def pending(pid: int) -> int:
    try:
        masks = signal_masks(pid)
    except OSError:  # gone meanwhile
        return 0
    return masks["SigPnd"] | masks["ShdPnd"]


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, what
        time.sleep(0.1)


def sacct(env, fields: str, *args: str) -> list[str]:
    """The accounting's rows (allocations only), `fields` joined by |."""
    return subprocess.run(["sacct", "-X", "-n", "-P", "-o", fields, *args], env=env, capture_output=True, text=True,
                          check=True).stdout.split()


def start_sweep(args, env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sweep", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_the_script_sees_a_running_cluster_and_names_the_packages_when_missing(slurm, tmp_path):
    again = subprocess.run(["bash", str(SCRIPT), "start", slurm["SWEEP_SLURM_DIR"]], env={**os.environ, **slurm},
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and again.stdout.startswith("SLURM already running: "), again.stderr
    status = subprocess.run(["bash", str(SCRIPT), "status", slurm["SWEEP_SLURM_DIR"]], env={**os.environ, **slurm},
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and "slurmd running (pid " in status.stdout and " idle " in status.stdout
    # SLURM's daemons live in /usr/sbin: without it on PATH they are "not installed"
    missing = subprocess.run(["bash", str(SCRIPT), "start", str(tmp_path / "c")], capture_output=True, text=True,
                             env={**os.environ, "PATH": "/usr/bin:/bin"}, timeout=60)
    assert missing.returncode == 2 and missing.stdout == "" and not (tmp_path / "c").exists()
    assert missing.stderr.startswith("error: SLURM's packages are not installed (missing munged ")
    assert missing.stderr.strip().endswith("run apt-get update && apt-get install -y --no-install-recommends "
                                           "slurm-wlm slurmdbd mariadb-server munge")
    assert len(missing.stderr.strip().splitlines()) == 1


def test_slurm_sweep_gives_the_basic_table_and_a_resubmission_recomputes_nothing(tiny_model, tmp_path, cluster_env):
    axes = ["layer=0,2", "fmt=int8", "kind=weight,activation", "tensor=ffn_norm"]
    run_sweep(tiny_args(tiny_model, tmp_path, *axes, "metrics.generate=false", store="s1", sweep_dir="basic"),
              cluster_env)
    proc = run_sweep(tiny_args(tiny_model, tmp_path, *axes, *SLURM, store="s2", sweep_dir="slurm"), cluster_env)
    pd.testing.assert_frame_equal(read_table(tmp_path / "slurm")[NUMBERS], read_table(tmp_path / "basic")[NUMBERS])
    # no timeout_min on the command line: the time limit comes from the plan's estimate, and sbatch got it
    limit = next(line for line in proc.stdout.splitlines() if line.startswith("time limit per task: "))
    minutes = int(limit.split("hydra.launcher.timeout_min=")[1].split()[0])
    scripts = list((tmp_path / "slurm" / ".submitit").glob("*/*_submission.sh"))
    assert len(scripts) == 1 and f"#SBATCH --time={minutes}\n" in scripts[0].read_text()
    assert "#SBATCH --time=7\n" in _resubmit_recomputes_nothing(tiny_model, tmp_path, axes, cluster_env)


def _resubmit_recomputes_nothing(tiny_model, tmp_path, axes, cluster_env) -> str:
    """The same sweep into a new sweep dir with the same store: every task finds its point stored."""
    before = stored_points(tmp_path / "s2")
    run_sweep(tiny_args(tiny_model, tmp_path, *axes, *SLURM, "hydra.launcher.timeout_min=7", store="s2",
                        sweep_dir="again"), cluster_env)
    logs = task_logs(tmp_path / "again")
    assert logs.count("already done") == 4 and "loading " not in logs
    assert stored_points(tmp_path / "s2") == before  # nothing rewritten
    pd.testing.assert_frame_equal(read_table(tmp_path / "again")[NUMBERS], read_table(tmp_path / "slurm")[NUMBERS])
    return next((tmp_path / "again" / ".submitit").glob("*/*_submission.sh")).read_text()


def test_a_cancelled_task_leaves_the_table_of_the_rest_and_the_command_that_finishes_it(tiny_model, tmp_path,
                                                                                         cluster_env):
    args = tiny_args(tiny_model, tmp_path, "layer=0,1,2", "fmt=int8", "kind=weight", "tensor=ffn_norm", *SLURM,
                     "hydra.launcher.timeout_min=5")
    driver = start_sweep(args, cluster_env)
    pid, job = task_process(tmp_path / "sweep", 1)
    os.kill(pid, signal.SIGSTOP)  # hold it mid-point, so that the cancel surely finds it running
    subprocess.run(["scancel", job], env=cluster_env, check=True)
    out, err = driver.communicate(timeout=300)
    assert driver.returncode == 1, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith("incomplete: 1 point did not finish: ") and "layer=1 " in line, err[-3000:]
    assert "layer=0" not in line.split(". The table")[0] and "(task " + job + ": state CANCELLED" in line
    df = read_table(tmp_path / "sweep")
    assert list(df["layer"]) == [0, 2] and set(df["status"]) == {"ok"}  # what finished, in the table
    assert json.loads((tmp_path / "sweep" / "incomplete.json").read_text())["missing"][0]["job"] == job
    assert len(stored_points(tmp_path / "store")) == 2
    # the printed command, run as printed (same sweep dir), computes only the missing point
    command = shlex.split(line.split("only the missing): ", 1)[1])
    assert command[:3] == ["python", "-m", "sweep"] and command[3:] == args
    before = stored_points(tmp_path / "store")
    rerun = subprocess.run([sys.executable, *command[1:]], cwd=ROOT, env=cluster_env, capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    after = stored_points(tmp_path / "store")
    assert len(after) == 3 and {k: after[k] for k in before} == before
    assert list(read_table(tmp_path / "sweep")["layer"]) == [0, 1, 2]
    assert not (tmp_path / "sweep" / "incomplete.json").exists()


def test_a_task_at_its_time_limit_is_requeued_and_finishes(tiny_model, tmp_path, cluster_env):
    # A one-minute limit, and USR2 asked 5 s before it: slurmctld checks limits every 30 s and sends the signal once
    # the time left is below 5 + 30 s, so 25-55 s into the task and always before the kill. The task's process is
    # held stopped until SLURM's USR2 is pending: a point slower than its limit. The requeued task finishes within
    # the 25 s it has before such a signal again.
    args = tiny_args(tiny_model, tmp_path, "layer=1", "fmt=int8", "kind=weight", "tensor=ffn_norm", *SLURM,
                     "hydra.launcher.timeout_min=1", "hydra.launcher.signal_delay_s=5")
    driver = start_sweep(args, cluster_env)
    pid, job = task_process(tmp_path / "sweep", 0)
    # stopped only once submitit handles USR2 (a USR2 without a handler kills even a stopped process)
    wait_until(lambda: signal_masks(pid)["SigCgt"] & USR2, 60, "submitit never installed its USR2 handler")
    os.kill(pid, signal.SIGSTOP)
    # slurmstepd continues a stopped task to deliver the signal; if it has not, USR2 waits pending: continue it here
    wait_until(lambda: not Path(f"/proc/{pid}").exists() or pending(pid) & USR2, 75,
               "SLURM sent no USR2 before the time limit")
    if Path(f"/proc/{pid}").exists():
        os.kill(pid, signal.SIGCONT)
    out, err = driver.communicate(timeout=300)
    assert driver.returncode == 0, err[-3000:]
    df = read_table(tmp_path / "sweep")
    assert list(df["layer"]) == [1] and list(df["status"]) == ["ok"]
    logs = task_logs(tmp_path / "sweep")
    assert "this job is timed-out" in logs and "Requeued" in logs and "Job completed successfully" in logs
    # slurmdbd records the end a moment after the driver has seen it: RUNNING for a second or so
    wait_until(lambda: sacct(cluster_env, "State", "-D", "-j", job)[-1:] != ["RUNNING"], 30,
               "the accounting never recorded the task's end")
    assert sacct(cluster_env, "State", "-D", "-j", job) == ["REQUEUED", "COMPLETED"]


def test_the_launching_process_loads_no_model(tiny_model, tmp_path, cluster_env):
    """The generation check of the worst point runs as a task of its own; the driver's peak RSS stays small."""
    args = tiny_args(tiny_model, tmp_path, "layer=0,2", "fmt=int8", "kind=weight", "tensor=ffn_norm",
                     *SLURM[:-1], "metrics.generate=top:1", "hydra.launcher.timeout_min=5")
    driver = start_sweep(args, cluster_env)
    peak_kb = 0
    while driver.poll() is None:
        try:
            status = Path(f"/proc/{driver.pid}/status").read_text()
            peak_kb = max(peak_kb, int(next(x for x in status.splitlines() if x.startswith("VmHWM:")).split()[1]))
        except (OSError, StopIteration):
            pass
        time.sleep(0.05)
    out, err = driver.communicate()
    assert driver.returncode == 0, err[-3000:]
    assert 0 < peak_kb * 1024 < 0.5e9, f"driver peak RSS {peak_kb / 1e6:.2f} GB"
    assert "loading " not in err and "loading " not in out
    df = read_table(tmp_path / "sweep")
    assert df["generation_checked"].tolist().count("top") == 1
    # the check ran as a job of its own (slurmdbd records its end a moment after the driver has seen it)
    wait_until(lambda: "generation_check|COMPLETED" in sacct(cluster_env, "JobName,State"), 30,
               "no completed generation_check job in the accounting")
