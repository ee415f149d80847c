"""A real hostfile launch on this machine: launch.py -> deepspeed runner -> pdsh -> ssh -> one rank on each
of `localhost` and `127.0.0.1` (two CPU processes on gloo), given a brace-pattern `data.shards`. pdsh hands
the overrides to a remote shell; unquoted, the pattern would become one `data.shards=` per shard and each
rank would read only the last. Every rank must report all the shards.

Needs sshd, ssh and pdsh (`.ci/run` installs them with apt-get where it can). The test starts its own sshd
on a free port of 127.0.0.1 with a throwaway host key and user key under tmp_path, and puts an `ssh` first
on PATH that uses them (ssh reads ~/.ssh of the passwd entry, not $HOME, so a temporary HOME would not
do): nothing of the user's ~/.ssh is read or changed. It skips, saying why, where those programs are
missing or that sshd cannot start; a launch that fails after that is a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.run_helpers import free_port, steps_override, write_text_shards

ROOT = Path(__file__).resolve().parents[1]
SBIN = "/usr/sbin:/sbin:/usr/local/sbin"  # sshd is not on a normal user's PATH
N_SHARDS, STEPS = 4, 2
LAUNCH_TIMEOUT_S = 170


def missing_programs() -> list[str]:
    wanted = {"sshd": "openssh-server", "ssh": "openssh-client", "ssh-keygen": "openssh-client", "pdsh": "pdsh"}
    path = f"{os.environ.get('PATH', '')}{os.pathsep}{SBIN}"
    return [f"{prog} ({pkg})" for prog, pkg in wanted.items() if shutil.which(prog, path=path) is None]


def kill_processes_mentioning(marker: str) -> None:
    """Ranks started through sshd are not our children: find this test's stragglers by their unique
    run directory on the command line and kill each by pid."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            try:
                os.kill(int(entry.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def ssh_to_localhost(tmp_path):
    """(directory to put first on PATH, sshd port): an sshd on 127.0.0.1 that lets this user in with a
    throwaway key, and an `ssh` wrapper that uses that key."""
    missing = missing_programs()
    if missing:
        pytest.skip(f"needs {', '.join(missing)}: .ci/run installs them with apt-get (Debian/Ubuntu, root)")
    path = f"{os.environ['PATH']}{os.pathsep}{SBIN}"
    sshd, ssh, keygen = (shutil.which(p, path=path) for p in ("sshd", "ssh", "ssh-keygen"))
    d = tmp_path / "ssh"
    d.mkdir(mode=0o700)
    for key in ("host_key", "id_key"):
        subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True, timeout=30)
    shutil.copy(d / "id_key.pub", d / "authorized_keys")
    port = free_port()
    (d / "sshd_config").write_text(
        f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\n"
        "PubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "PermitRootLogin prohibit-password\nUsePAM no\nStrictModes no\nPidFile none\n")
    (d / "ssh_config").write_text(
        f"Host *\n  IdentityFile {d}/id_key\n  IdentitiesOnly yes\n  BatchMode yes\n"
        f"  StrictHostKeyChecking accept-new\n  UserKnownHostsFile {d}/known_hosts\n  LogLevel ERROR\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text(f'#!/bin/sh\nexec {ssh} -F {d}/ssh_config "$@"\n')
    (bin_dir / "ssh").chmod(0o755)
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege-separation directory
    log = open(d / "sshd.log", "w")
    proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(d / "sshd_config")], stdout=log, stderr=subprocess.STDOUT)
    probe = [str(bin_dir / "ssh"), "-p", str(port), "127.0.0.1", "true"]
    try:
        for _ in range(50):
            if proc.poll() is not None:
                break
            if subprocess.run(probe, capture_output=True, timeout=30).returncode == 0:
                break
            time.sleep(0.2)
        else:
            pytest.skip(f"sshd started but refused the test's key: {(d / 'sshd.log').read_text()[-500:]}")
        if proc.poll() is not None:
            pytest.skip(f"sshd could not start here: {(d / 'sshd.log').read_text()[-500:]}")
        yield bin_dir, port
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_hostfile_launch_ranks_read_every_shard(tmp_path, ssh_to_localhost):
    bin_dir, ssh_port = ssh_to_localhost
    write_text_shards(tmp_path / "shards", N_SHARDS)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    # a space and a pdsh token (%h) in the run directory: both must reach the ranks as written
    run_dir = tmp_path / "run dir %h"
    overrides = [f"data.shards='{tmp_path}/shards/part-{{0..{N_SHARDS - 1}}}.tar'", steps_override(STEPS),
                 "logging.wandb.mode=disabled", f"run_dir={run_dir}"]
    argv = [sys.executable, str(ROOT / "launch/launch.py"), "hostfile", "--hostfile", str(hostfile),
            "--ssh-port", str(ssh_port), "--master-port", str(free_port()), "--python", sys.executable,
            "--env-file", str(tmp_path / "ds_env"), "--env", "OMP_NUM_THREADS=1", *overrides]
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    start = time.monotonic()
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # launch.py passes it to the runner's whole process group
        out, _ = proc.communicate(timeout=150)
        pytest.fail(f"the launch took over {LAUNCH_TIMEOUT_S} s:\n{out[-4000:]}")
    finally:
        kill_processes_mentioning(str(run_dir))
    elapsed = time.monotonic() - start
    print(f"hostfile launch: exit {proc.returncode} after {elapsed:.0f} s")
    print("\n".join(line for line in out.splitlines() if "data: " in line or "pdsh" in line))
    quiet = "\n".join(line for line in out.splitlines() if "] [INFO] [" not in line)  # without the runners' chatter
    assert proc.returncode == 0, quiet[-6000:]
    # pdsh prefixes each line with the host it came from
    seen = {(host, int(rank)): (int(world), int(n)) for host, rank, world, n in re.findall(
        r"^(\S+): .*data: data-parallel rank (\d+) of (\d+) reads (\d+) shards", out, re.M)}
    assert seen == {("localhost", 0): (2, N_SHARDS), ("127.0.0.1", 1): (2, N_SHARDS)}, quiet[-6000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(STEPS))
