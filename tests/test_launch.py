"""Launch scripts: the commands each mode would run for 2 nodes x 8 GPUs, and bad input."""

import argparse
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "launch"))
import launch  # noqa: E402

# launch.py does not read the overrides; these only have to arrive intact (a space, a brace pattern, a %)
OVERRIDES = ["model=tiny", "run.steps=20", "parallel.sp_size=2", "run_dir=runs/two nodes",
             "data.shards='/data/{000..009}.tar'", "logging.wandb.name=run%h"]


def dry_run(capsys, *argv):
    assert launch.main([*argv, "--dry-run", "--python", "python", *OVERRIDES]) == 0
    out = capsys.readouterr().out
    commands = [line for line in out.splitlines() if line.startswith("env ")]
    assert len(commands) == 1, out
    words = shlex.split(commands[0])[1:]
    first = next(i for i, w in enumerate(words) if "=" not in w)  # env KEY=VALUE ... program args
    env = dict(w.split("=", 1) for w in words[:first])
    argv = words[first:]
    return out, env, argv


def assert_common(env, argv, passed=OVERRIDES):
    assert env["NCCL_NVLS_ENABLE"] == "0"
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert argv[-len(passed):] == passed  # overrides pass through unchanged (quoting kept)
    assert "--local_rank" not in " ".join(argv)


def through_remote_shell(args: list[str]) -> list[str]:
    """The words the ranks' shell makes of ``args`` after DeepSpeed's pdsh runner joined them into its
    remote command line: its own argument processing, then bash (the remote login shell)."""
    from deepspeed.launcher.multinode_runner import PDSHRunner

    runner = PDSHRunner.__new__(PDSHRunner)  # only parse_user_args is used; it reads args.user_args
    runner.args = argparse.Namespace(user_args=args)
    line = " ".join(runner.parse_user_args())
    proc = subprocess.run(["bash", "-c", f"printf '%s\\0' {line}"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split("\0")[:-1]


def flag(argv, name):
    return argv[argv.index(name) + 1]


def test_local_deepspeed(capsys):
    _, env, argv = dry_run(capsys, "local", "--gpus", "8")
    assert_common(env, argv)
    assert argv[:4] == ["python", "-u", "-m", "deepspeed.launcher.runner"]
    assert flag(argv, "--num_gpus") == "8"
    assert "--no_local_rank" in argv and flag(argv, "--module") == "train"


def test_local_torchrun(capsys):
    _, env, argv = dry_run(capsys, "local", "--gpus", "8", "--launcher", "torchrun")
    assert_common(env, argv)
    assert "--standalone" in argv and flag(argv, "--nproc-per-node") == "8"
    assert flag(argv, "-m") == "torch.distributed.run"
    assert argv[-len(OVERRIDES) - 2:-len(OVERRIDES)] == ["-m", "train"]


def test_hostfile_two_nodes(capsys, tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# two nodes\nnode-a slots=8\n\nnode-b slots=8   # spare\n")
    env_file = tmp_path / "ds_env"
    out, env, argv = dry_run(capsys, "hostfile", "--hostfile", str(hostfile), "--env-file", str(env_file),
                             "--env", "NCCL_IB_HCA=mlx5", "--ssh-port", "2222")
    passed = argv[argv.index("train") + 1:]
    assert_common(env, argv, passed)
    # pdsh hands the overrides to a remote shell: quoted here, they reach the ranks as they were given
    # (pdsh itself then turns each %% back into %; tests/test_hostfile_launch.py runs the real thing)
    assert through_remote_shell(passed) == [o.replace("%", "%%") for o in OVERRIDES]
    assert through_remote_shell(OVERRIDES) != OVERRIDES  # unquoted, the brace pattern would not survive
    assert "16 ranks" in out
    assert (flag(argv, "--num_nodes"), flag(argv, "--num_gpus")) == ("2", "8")
    assert flag(argv, "--master_addr") == "node-a" and env["MASTER_ADDR"] == "node-a"
    assert "--no_local_rank" in argv and flag(argv, "--launcher") == "pdsh"
    assert flag(argv, "--ssh_port") == "2222"
    # the env file reaches the remote nodes; the dry run shows it but does not write it
    assert env["DS_ENV_FILE"] == str(env_file) and not env_file.exists()
    for line in ("NCCL_NVLS_ENABLE=0", "TORCH_NCCL_ASYNC_ERROR_HANDLING=1", "NCCL_IB_HCA=mlx5",
                 "MASTER_PORT=29500"):
        assert f"#   {line}" in out


def test_hostfile_other_backends_pass_overrides_as_argv(capsys, tmp_path):
    """mpirun and srun hand the ranks their argv without a shell: nothing to quote."""
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node-a slots=8\nnode-b slots=8\n")
    _, env, argv = dry_run(capsys, "hostfile", "--hostfile", str(hostfile), "--backend", "openmpi")
    assert_common(env, argv)


def test_torchrun_two_nodes(capsys):
    out, env, argv = dry_run(capsys, "torchrun", "--nnodes", "2", "--gpus", "8", "--rdzv-endpoint",
                             "node-a:29400", "--rdzv-id", "job7")
    assert_common(env, argv)
    assert "each node" in out
    assert (flag(argv, "--nnodes"), flag(argv, "--nproc-per-node")) == ("2", "8")
    assert (flag(argv, "--rdzv-backend"), flag(argv, "--rdzv-endpoint"), flag(argv, "--rdzv-id")) == (
        "c10d", "node-a:29400", "job7")


def test_slurm_sbatch_two_nodes():
    """The sbatch script itself, run outside SLURM with the allocation's variables set."""
    env = {**os.environ, "PYTHON": sys.executable, "SLURM_JOB_NODELIST": "gpu[07-08]-ib", "SLURM_JOB_ID": "4242",
           "SLURM_GPUS_ON_NODE": "8", "SLURM_CPUS_ON_NODE": "96", "MSA_REPO": str(ROOT)}
    proc = subprocess.run(["bash", str(ROOT / "launch/slurm.sbatch"), "--dry-run", "--python", "python",
                           "--srun-args=--container-image=msa.sqsh", *OVERRIDES],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("env "))
    words = shlex.split(line)
    argv = words[words.index("srun"):]
    assert "NCCL_NVLS_ENABLE=0" in words and "MASTER_ADDR=gpu07-ib" in words
    assert flag(argv, "--nodes") == "2" and flag(argv, "--ntasks-per-node") == "1"
    assert flag(argv, "--cpus-per-task") == "96"  # the node's CPUs, not srun's default of one
    assert "--container-image=msa.sqsh" in argv
    assert (flag(argv, "--nnodes"), flag(argv, "--nproc-per-node")) == ("2", "8")
    assert flag(argv, "--rdzv-endpoint") == "gpu07-ib:29500" and flag(argv, "--rdzv-id") == "4242"
    assert argv[-len(OVERRIDES):] == OVERRIDES


def test_shell_wrapper_single_node():
    proc = subprocess.run([str(ROOT / "launch/single_node.sh"), "--gpus", "8", "--dry-run", "run.steps=3",
                           "run_dir=runs/x"],
                          env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--no_local_rank --module train run.steps=3 run_dir=runs/x" in proc.stdout


@pytest.mark.parametrize("text, lineno, what", [
    ("node-a slots=8\n# ok\nnode-b slot=8\n", 3, "'node-b slot=8'"),
    ("node-a slots=8\nnode-b\n", 2, "'node-b'"),
    ("node-a slots=8\nnode-b slots=0\n", 2, "no slots"),
    ("node-a slots=8\nnode-a slots=8\n", 2, "already listed on line 1"),
])
def test_malformed_hostfile_names_the_line(capsys, tmp_path, text, lineno, what):
    hostfile = tmp_path / "hosts"
    hostfile.write_text(text)
    assert launch.main(["hostfile", "--hostfile", str(hostfile), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"line {lineno}" in err and what in err, err


def test_bad_requests_name_what_to_change(capsys, monkeypatch):
    assert launch.main(["local", "--gpus", "8", "--dry-run", "--env", "NCCL_NVLS_ENABLE=1"]) == 2
    assert "NCCL_NVLS_ENABLE" in capsys.readouterr().err
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "1")
    assert launch.main(["local", "--gpus", "8", "--dry-run"]) == 2
    monkeypatch.delenv("NCCL_NVLS_ENABLE")
    monkeypatch.delenv("SLURM_JOB_NODELIST", raising=False)
    assert launch.main(["slurm", "--gpus", "8", "--dry-run"]) == 2
    assert "SLURM_JOB_NODELIST" in capsys.readouterr().err
    monkeypatch.delenv("SLURM_CPUS_ON_NODE", raising=False)
    assert launch.main(["slurm", "--nodelist", "gpu[01-02]", "--gpus", "8", "--dry-run", "run_dir=x"]) == 2
    assert "--cpus-per-task" in capsys.readouterr().err
    assert launch.main(["local", "--gpus", "8", "--dry-run", "run.steps=3"]) == 2
    assert "run_dir" in capsys.readouterr().err
    bad_endpoint = ["torchrun", "--nnodes", "2", "--gpus", "8", "--rdzv-endpoint", "node-a", "--dry-run"]
    assert launch.main(bad_endpoint) == 2
    assert "--rdzv-endpoint" in capsys.readouterr().err


def test_world_size_is_left_to_the_app(capsys):
    """launch.py does not read overrides (sp/cp may come from YAML or a recipe stage); the app refuses a
    world size that does not split into sp*cp groups at start, naming the keys."""
    from tests.utils import check_every_stage, compose_train_config

    assert launch.main(["local", "--gpus", "8", "--dry-run", "parallel.sp_size=3", "run_dir=x"]) == 0
    assert "parallel.sp_size=3" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"parallel\.sp_size/parallel\.cp_size"):
        check_every_stage(compose_train_config(["parallel.sp_size=3"]), world_size=8)


@pytest.mark.parametrize("nodelist, hosts", [
    ("gpu[01-03,10],login1", ["gpu01", "gpu02", "gpu03", "gpu10", "login1"]),
    ("a[8-11]", ["a8", "a9", "a10", "a11"]),
    ("solo", ["solo"]),
    ("gpu[01-02]-ib", ["gpu01-ib", "gpu02-ib"]),
    ("node-7,gpu[098-100]-ib,x", ["node-7", "gpu098-ib", "gpu099-ib", "gpu100-ib", "x"]),
    ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert launch.expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist", ["gpu[01-x]", "gpu[02-01]", "gpu[01-02", "gpu]", "a,,b", "", "a,"])
def test_expand_nodelist_rejects(nodelist):
    with pytest.raises(launch.LaunchError, match="node list"):
        launch.expand_nodelist(nodelist)


def test_slurm_hostnames_asks_scontrol_where_present(tmp_path, monkeypatch):
    fake = tmp_path / "scontrol"
    fake.write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && printf "%s-from-scontrol\\n" a b\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert launch.slurm_hostnames("gpu[01-02]") == ["a-from-scontrol", "b-from-scontrol"]
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    assert launch.slurm_hostnames("gpu[01-02]") == ["gpu01", "gpu02"]


def test_docker_requirements_pin_every_dependency():
    """docker/requirements.txt pins each pyproject dependency (torch/triton come from the base image)."""
    import tomllib
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["tokenizers"]]
    pins = {}
    for line in (ROOT / "docker/requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"{line}: pin an exact version"
            pins[req.name.lower()] = spec.version
    for req in wanted:
        if req.name in ("torch", "triton"):
            assert req.name not in pins, f"{req.name} must come from the CUDA base image"
            continue
        assert req.name.lower() in pins, f"{req.name} is not pinned in docker/requirements.txt"
        assert req.specifier.contains(pins[req.name.lower()]), f"{req.name}=={pins[req.name.lower()]} vs {req}"
    dockerfile = (ROOT / "docker/Dockerfile").read_text()
    assert "NCCL_NVLS_ENABLE=0" in dockerfile and "pip install --no-deps --no-build-isolation -e ." in dockerfile


def test_docker_base_is_the_tested_pair():
    """The image's base, the build's version check and the versions the kernels were measured with
    (docs/benchmarks.md) name one torch/Triton/CUDA set."""
    import re

    dockerfile = (ROOT / "docker/Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=pytorch/pytorch:([\d.]+)-cuda([\d.]+)-cudnn\d+-devel$", dockerfile, re.M)
    torch_arg = re.search(r"^ARG TORCH_VERSION=(\S+)$", dockerfile, re.M)
    triton_arg = re.search(r"^ARG TRITON_VERSION=(\S+)$", dockerfile, re.M)
    assert base and torch_arg and triton_arg, "BASE_IMAGE, TORCH_VERSION or TRITON_VERSION not found"
    assert "set TORCH_VERSION and TRITON_VERSION" in dockerfile  # the build checks the base against them
    measured = re.search(r"torch ([\d.]+)\+cu(\d+)\d, triton ([\d.]+), CUDA ([\d.]+)",
                         (ROOT / "docs/benchmarks.md").read_text())
    assert measured, "docs/benchmarks.md no longer states torch/triton/CUDA"
    torch_v, cu_major, triton_v, cuda = measured.groups()
    assert (base[1], torch_arg[1], triton_arg[1]) == (torch_v, torch_v, triton_v)
    assert base[2] == cuda and cuda.split(".")[0] == cu_major


def test_signal_reaches_ranks_whose_runner_does_not_forward(tmp_path):
    """The deepspeed runner dies on SIGTERM without passing it on; launch.py signals the whole group."""
    marker = tmp_path / "rank_got_sigterm"
    rank = (f"import signal, time, pathlib\n"
            f"signal.signal(signal.SIGTERM, lambda *a: (pathlib.Path({str(marker)!r}).touch(), exit(0)))\n"
            f"print('ready', flush=True)\n"
            f"time.sleep(60)\n")
    runner = f"import subprocess, sys, time\nsubprocess.Popen([sys.executable, '-c', {rank!r}])\ntime.sleep(60)\n"
    parent = (f"import sys; sys.path.insert(0, {str(ROOT / 'launch')!r}); import launch, os\n"
              f"sys.exit(launch.run_forwarding_signals([sys.executable, '-c', {runner!r}], dict(os.environ)))\n")
    proc = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM  # the runner died of it
    for _ in range(100):
        if marker.exists():
            break
        time.sleep(0.05)
    assert marker.exists(), "the rank never saw the SIGTERM"
