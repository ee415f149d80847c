"""Build and run the command lines that start `python -m train` on one or many GPU nodes.

    python launch/launch.py [--dry-run] local    --gpus 8 [--launcher deepspeed|torchrun] [overrides]
    python launch/launch.py [--dry-run] hostfile --hostfile hosts.txt [--gpus 8] [--ssh-port 22] [overrides]
    python launch/launch.py [--dry-run] torchrun --nnodes 2 --gpus 8 --rdzv-endpoint host:29500 [overrides]
    python launch/launch.py [--dry-run] slurm    [--gpus 8] [--cpus-per-task N] [overrides]  (in an allocation)

Everything that is not an option of this script is a Hydra override and reaches `python -m train`
unchanged (`run.steps=100 parallel.sp_size=2 run_dir=runs/x`); this script does not read them. Where
pdsh passes them through a remote shell they are quoted for it. DeepSpeed is started with
`--no_local_rank` (Hydra rejects `--local_rank`; the app reads LOCAL_RANK from the environment). Every
mode sets the NCCL environment a multi-node run needs and keeps NVLink multicast (NVLS) off.
`--dry-run` prints the environment and commands instead of running them.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

DEFAULT_PORT = 29500
GROUP_GRACE_S = 120.0  # after the launcher exits, how long its ranks may take to finish a save
# NVLink multicast (NCCL NVLS) stays off on every node: it is not available on the lent machines and
# pins extra memory per communicator where it is.
FORCED_ENV = {"NCCL_NVLS_ENABLE": "0"}
# Defaults the caller's environment may override.
DEFAULT_ENV = {
    # a rank whose NCCL op fails or times out tears its process down instead of hanging the job
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    "NCCL_DEBUG": "WARN",
    "PYTHONUNBUFFERED": "1",
}
HOSTFILE_LINE = re.compile(r"^(?P<host>\S+)\s+slots=(?P<slots>\d+)$")


class LaunchError(ValueError):
    """A launch request that cannot work; the message names the option or line to fix."""


@dataclass
class Command:
    argv: list[str]
    env: dict[str, str]
    where: str
    files: dict[str, str] = field(default_factory=dict)

    def render(self) -> str:
        lines = [f"# {self.where}"]
        for path, text in self.files.items():
            lines.append(f"# writes {path}:")
            lines += [f"#   {line}" for line in text.splitlines()]
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        lines.append(f"env {env} {shlex.join(self.argv)}")
        return "\n".join(lines)


def parse_hostfile(path: str) -> list[tuple[str, int]]:
    """DeepSpeed/MPI hostfile: one `<hostname> slots=<gpus>` per line; `#` comments and blank lines."""
    try:
        text = open(path).read()
    except OSError as e:
        raise LaunchError(f"--hostfile {path}: {e.strerror}") from e
    hosts: list[tuple[str, int]] = []
    seen: dict[str, int] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = HOSTFILE_LINE.match(line)
        if m is None:
            raise LaunchError(f"hostfile {path} line {lineno}: {raw.strip()!r} is not "
                              f"'<hostname> slots=<gpus>'")
        host, slots = m["host"], int(m["slots"])
        if slots < 1:
            raise LaunchError(f"hostfile {path} line {lineno}: {raw.strip()!r} has no slots")
        if host in seen:
            raise LaunchError(f"hostfile {path} line {lineno}: host {host!r} already listed on line "
                              f"{seen[host]}")
        seen[host] = lineno
        hosts.append((host, slots))
    if not hosts:
        raise LaunchError(f"hostfile {path} lists no hosts")
    return hosts


def slurm_hostnames(nodelist: str) -> list[str]:
    """Host names of a SLURM node list: `scontrol show hostnames` where SLURM is installed (it knows every
    form the site uses), else `expand_nodelist` (dry runs off the cluster)."""
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        return expand_nodelist(nodelist)
    proc = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True)
    hosts = proc.stdout.split()
    if proc.returncode or not hosts:
        raise LaunchError(f"scontrol show hostnames {nodelist!r} failed: {proc.stderr.strip() or 'no hosts'}")
    return hosts


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list without `scontrol`: comma-separated names, each any mix of text and
    bracketed ranges (`gpu[01-03,07]`, `gpu[01-02]-ib`, `rack[1-2]-n[01-04]`, `login1`)."""
    bad = LaunchError(f"SLURM node list {nodelist!r} is not a host list like 'gpu[01-02]-ib,login1'")
    hosts: list[str] = []
    names = [""]
    for piece in re.findall(r"\[[^\[\]]*\]|[^,\[\]]+|,|.", nodelist) + [","]:
        if piece == ",":
            if names == [""]:
                raise bad
            hosts += names
            names = [""]
        elif piece.startswith("[") and piece.endswith("]"):
            names = [name + value for name in names for value in _expand_ranges(nodelist, piece[1:-1])]
        elif piece in "[]":
            raise bad
        else:
            names = [name + piece for name in names]
    return hosts


def _expand_ranges(nodelist: str, ranges: str) -> list[str]:
    """`01-03,10` -> 01 02 03 10 (the width of the lower bound is kept)."""
    values = []
    for part in ranges.split(","):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()) or int(hi or lo) < int(lo):
            raise LaunchError(f"SLURM node list {nodelist!r}: cannot read range {part!r}")
        values += [f"{i:0{len(lo)}d}" for i in range(int(lo), int(hi or lo) + 1)]
    return values


def launch_env(args) -> dict[str, str]:
    """What each rank's environment gets on top of the caller's."""
    env = {k: os.environ.get(k, v) for k, v in DEFAULT_ENV.items()}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise LaunchError(f"--env {item!r}: expected KEY=VALUE")
        env[key] = value
    if args.nccl_ifname:
        env["NCCL_SOCKET_IFNAME"] = env["GLOO_SOCKET_IFNAME"] = args.nccl_ifname
    for key, value in FORCED_ENV.items():
        if env.get(key, value) != value or os.environ.get(key, value) != value:
            raise LaunchError(f"{key} must stay {value} (NVLink multicast is kept off); "
                              f"unset it or drop --env {key}=...")
        env[key] = value
    return env


def pdsh_quote(arg: str) -> str:
    """An override as the deepspeed runner's pdsh backend must receive it for the rank to get ``arg``.
    pdsh joins the command into one line that the remote login shell parses again (unquoted, a brace
    pattern `data.shards='d/{0..9}.tar'` becomes ten `data.shards=` overrides and Hydra keeps the last)
    and replaces %n/%h/%u in it (%% is a literal %). The runner (DeepSpeed 0.19.8) wraps an argument
    holding a space in double quotes and escapes only its `"`; inside those \\ $ ` are still special."""
    quoted = re.sub(r"([\\$`])", r"\\\1", arg) if " " in arg else shlex.quote(arg)
    return quoted.replace("%", "%%")


def train_args(args) -> list[str]:
    return ["-m", "train", *args.overrides]


def deepspeed_runner(args) -> list[str]:
    return [args.python, "-u", "-m", "deepspeed.launcher.runner"]


def torchrun(args) -> list[str]:
    return [args.python, "-m", "torch.distributed.run"]


def local_commands(args) -> list[Command]:
    env = launch_env(args)
    where = f"this node, {args.gpus} GPUs, {args.launcher}"
    if args.launcher == "deepspeed":
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.master_port))
        argv = deepspeed_runner(args) + ["--num_gpus", str(args.gpus), "--master_port", str(args.master_port),
                                         "--no_local_rank", "--module", "train", *args.overrides]
    else:
        argv = torchrun(args) + ["--standalone", "--nnodes", "1", "--nproc-per-node", str(args.gpus),
                                 *train_args(args)]
    return [Command(argv, env, where)]


def hostfile_commands(args) -> list[Command]:
    hosts = parse_hostfile(args.hostfile)
    gpus = args.gpus or hosts[0][1]
    short = [h for h, slots in hosts if slots < gpus]
    if short:
        raise LaunchError(f"--gpus {gpus} but hostfile {args.hostfile} gives fewer slots to "
                          f"{', '.join(short)}")
    master = args.master_addr or hosts[0][0]
    env = launch_env(args)
    env.update(MASTER_ADDR=master, MASTER_PORT=str(args.master_port))
    # The runner forwards only NCCL*/PYTHON* variables to remote nodes by itself; the rest go through
    # its environment file (DS_ENV_FILE, read on this node, exported on every node).
    env_file = args.env_file or os.path.join(tempfile.gettempdir(), f"msa-deepspeed-env-{os.getpid()}")
    env["DS_ENV_FILE"] = env_file
    file_text = "".join(f"{k}={v}\n" for k, v in sorted(env.items()) if k != "DS_ENV_FILE")
    # the other backends (openmpi, slurm...) hand the ranks argv as it is; pdsh goes through a shell
    overrides = [pdsh_quote(o) for o in args.overrides] if args.backend == "pdsh" else args.overrides
    argv = deepspeed_runner(args) + [
        "--hostfile", args.hostfile, "--num_nodes", str(len(hosts)), "--num_gpus", str(gpus),
        "--master_addr", master, "--master_port", str(args.master_port), "--launcher", args.backend,
        *(["--ssh_port", str(args.ssh_port)] if args.ssh_port else []),
        "--no_local_rank", "--module", "train", *overrides]
    where = (f"{len(hosts)} nodes x {gpus} GPUs = {len(hosts) * gpus} ranks through the deepspeed launcher "
             f"({args.backend}); run once, on {master}")
    return [Command(argv, env, where, {env_file: file_text})]


def torchrun_commands(args) -> list[Command]:
    host, _, port = args.rdzv_endpoint.rpartition(":")
    if not host or not port.isdigit():
        raise LaunchError(f"--rdzv-endpoint {args.rdzv_endpoint!r}: expected host:port")
    env = launch_env(args)
    argv = torchrun(args) + [
        "--nnodes", str(args.nnodes), "--nproc-per-node", str(args.gpus), "--rdzv-backend", "c10d",
        "--rdzv-endpoint", args.rdzv_endpoint, "--rdzv-id", args.rdzv_id, "--max-restarts", "0",
        *train_args(args)]
    where = (f"{args.nnodes} nodes x {args.gpus} GPUs = {args.nnodes * args.gpus} ranks, torchrun c10d "
             f"rendezvous at {args.rdzv_endpoint}; run the same command on each node")
    return [Command(argv, env, where)]


def slurm_commands(args) -> list[Command]:
    nodelist = args.nodelist or os.environ.get("SLURM_JOB_NODELIST")
    if not nodelist:
        raise LaunchError("slurm mode runs inside an allocation (SLURM_JOB_NODELIST unset); submit "
                          "launch/slurm.sbatch with sbatch, or pass --nodelist for a dry run")
    hosts = slurm_hostnames(nodelist)
    gpus = args.gpus or int(os.environ.get("SLURM_GPUS_ON_NODE", "0") or 0)
    if gpus < 1:
        raise LaunchError("GPUs per node unknown: pass --gpus N or allocate with --gpus-per-node")
    # A task gets one CPU unless it asks for more, and srun (Slurm >= 22.05) does not inherit sbatch's
    # --cpus-per-task: the node's ranks and their loader workers would share one core.
    cpus = args.cpus_per_task or int(os.environ.get("SLURM_CPUS_ON_NODE", "0") or 0)
    if cpus < 1:
        raise LaunchError("CPUs per node unknown: pass --cpus-per-task N or run inside an allocation "
                          "(SLURM_CPUS_ON_NODE)")
    job = args.job_id or os.environ.get("SLURM_JOB_ID", "msa")
    endpoint = f"{hosts[0]}:{args.master_port}"
    env = launch_env(args)
    env.update(MASTER_ADDR=hosts[0], MASTER_PORT=str(args.master_port))
    srun = ["srun", "--nodes", str(len(hosts)), "--ntasks-per-node", "1", "--cpus-per-task", str(cpus),
            "--kill-on-bad-exit=1",
            *shlex.split(args.srun_args)]
    node = shlex.split(args.exec_prefix) + torchrun(args) + [
        "--nnodes", str(len(hosts)), "--nproc-per-node", str(gpus), "--rdzv-backend", "c10d",
        "--rdzv-endpoint", endpoint, "--rdzv-id", job, "--max-restarts", "0", *train_args(args)]
    where = (f"{len(hosts)} nodes x {gpus} GPUs = {len(hosts) * gpus} ranks under SLURM job {job}: one "
             f"torchrun per node ({', '.join(hosts)}) with {cpus} CPUs, rendezvous at {endpoint}")
    return [Command(srun + node, env, where)]


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dry-run", action="store_true", help="print the commands; run nothing")
    common.add_argument("--python", default=sys.executable, help="interpreter on the nodes (default: this)")
    common.add_argument("--master-port", type=int, default=DEFAULT_PORT)
    common.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra environment")
    common.add_argument("--nccl-ifname", help="network interface for NCCL and gloo (NCCL_SOCKET_IFNAME)")
    common.add_argument("overrides", nargs="*", help="Hydra overrides for python -m train")

    parser = argparse.ArgumentParser(prog="launch/launch.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", dest="dry_run_global", help=argparse.SUPPRESS)
    modes = parser.add_subparsers(dest="mode", required=True)

    p = modes.add_parser("local", parents=[common], help="one node, N GPUs")
    p.add_argument("--gpus", type=int, required=True)
    p.add_argument("--launcher", choices=("deepspeed", "torchrun"), default="deepspeed")

    p = modes.add_parser("hostfile", parents=[common], help="hostfile nodes, through the deepspeed launcher")
    p.add_argument("--hostfile", required=True, help="'<hostname> slots=<gpus>' per line")
    p.add_argument("--gpus", type=int, default=0, help="GPUs per node (default: the first host's slots)")
    p.add_argument("--master-addr", help="rendezvous host (default: the first host)")
    p.add_argument("--backend", default="pdsh", help="deepspeed --launcher: pdsh, openmpi, mvapich, slurm")
    p.add_argument("--env-file", help="where to write the environment the runner exports to every node")
    p.add_argument("--ssh-port", type=int, help="sshd port on the nodes (pdsh and the runner's ssh check)")

    p = modes.add_parser("torchrun", parents=[common], help="torchrun c10d rendezvous, run on each node")
    p.add_argument("--nnodes", type=int, required=True)
    p.add_argument("--gpus", type=int, required=True, help="GPUs per node")
    p.add_argument("--rdzv-endpoint", required=True, help="host:port of the rendezvous (any one node)")
    p.add_argument("--rdzv-id", default="msa", help="the same job id on every node")

    p = modes.add_parser("slurm", parents=[common], help="inside a SLURM allocation (see slurm.sbatch)")
    p.add_argument("--gpus", type=int, default=0, help="GPUs per node (default: SLURM_GPUS_ON_NODE)")
    p.add_argument("--nodelist", help="default: SLURM_JOB_NODELIST")
    p.add_argument("--job-id", help="rendezvous id (default: SLURM_JOB_ID)")
    p.add_argument("--cpus-per-task", type=int, default=0,
                   help="CPUs for each node's torchrun and its ranks (default: SLURM_CPUS_ON_NODE)")
    p.add_argument("--srun-args", default="", help="extra srun options, e.g. pyxis --container-image=...")
    p.add_argument("--exec-prefix", default="", help="wraps each node's command: 'apptainer exec --nv x.sif'")
    return parser


BUILDERS = {"local": local_commands, "hostfile": hostfile_commands, "torchrun": torchrun_commands,
            "slurm": slurm_commands}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    bad = [o for o in args.overrides if o.startswith("-")]
    if bad:
        parser.error(f"unknown option(s) {' '.join(bad)}; Hydra overrides look like key=value")
    for name in ("gpus", "nnodes"):
        if getattr(args, name, 1) < (1 if args.mode in ("local", "torchrun") else 0):
            parser.error(f"--{name} must be at least 1")
    try:
        commands = BUILDERS[args.mode](args)
        if not any(o.startswith("run_dir=") for o in args.overrides):
            # the default run_dir is a timestamp each process takes for itself: ranks would disagree
            raise LaunchError("pass run_dir=<path>: every rank (and a relaunch that resumes) must use the "
                              "same run directory")
    except LaunchError as e:
        print(f"launch: {e}", file=sys.stderr)
        return 2
    if args.dry_run or args.dry_run_global:
        print("\n".join(c.render() for c in commands))
        return 0
    (command,) = commands
    for path, text in command.files.items():
        with open(path, "w") as f:
            f.write(text)
    print(command.render(), file=sys.stderr, flush=True)
    return run_forwarding_signals(command.argv, {**os.environ, **command.env})


def run_forwarding_signals(argv: list[str], env: dict[str, str]) -> int:
    """Run the launcher in its own process group and pass SIGTERM/SIGINT/SIGUSR1 to the whole group.
    The deepspeed runner dies on SIGTERM without telling its children, so signalling only it would
    leave the ranks training; the ranks get the signal directly and save a checkpoint before exiting."""
    proc = subprocess.Popen(argv, env=env, start_new_session=True)

    def forward(signum, frame):
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, forward)
    code = proc.wait()
    wait_for_group(proc.pid, grace_s=GROUP_GRACE_S)
    return 128 - code if code < 0 else code


def wait_for_group(pgid: int, grace_s: float) -> None:
    """Return once every process of the group has exited (SIGKILL the rest after ``grace_s``), so the
    next job cannot meet ranks still saving or holding the rendezvous port."""
    end = time.monotonic() + grace_s
    while time.monotonic() < end:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.2)
    print(f"launch: processes of group {pgid} still running after {grace_s:.0f} s; killing them", file=sys.stderr)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


if __name__ == "__main__":
    sys.exit(main())
