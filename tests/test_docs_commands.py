"""Every command the docs show for the trainer runs as written.

Commands are taken from README.md, docs/*.md, launch/README.md and docker/README.md: fenced code blocks
(except those marked as another language: python, yaml, json...), indented code blocks, and inline code
spans that begin with a command. A line ending in `\\` continues on the next; `#` outside quotes starts a
comment; `;`, `&&`, `||`, `|` and redirections separate commands. A command is split with shlex as a POSIX
shell would split it (quotes removed, no expansion) and checked when it invokes the trainer:

- the app: `python -m train ...` (any `python*`, e.g. `.venv/bin/python`), `make train ARGS="..."`,
  `deepspeed ... --module/-m train ...`, `torchrun ... -m train ...`. Hydra's own command-line parser
  takes the arguments, Hydra's override parser must accept every override, and they must compose
  against conf/ into the typed config (an unknown key or a wrong type fails). `python -m train.<mod>`:
  the module must exist.
- a launcher: `launch/launch.py <mode>`, `launch/{single_node,multi_node,torchrun_multi_node}.sh`,
  `launch/slurm.sbatch` (directly, through `bash`/`sh` or `sbatch [options]`). It is run with `--dry-run`
  and must succeed, and its Hydra overrides are checked like the app's. `KEY=VALUE` words before the
  command are its environment. Outside SLURM the allocation's variables default to a 2-node job
  (FAKE_ALLOCATION) unless the command sets them; a `--hostfile` that does not exist is replaced by a
  2-node hostfile. A launcher called without an interpreter must be executable.

Skipped, and listed as skipped with the reason: templates, whose checked words hold a shell variable in
capitals or a command substitution (`run_dir=$RUN`, `"${ARGS[@]}"`, `$(...)`), which the reader or a
script fills in; and synopses, with a word in `[...]` or `<...>` (`[--gpus 8]`, `checkpoint=<dir>`).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "launch"))
import launch  # noqa: E402

DOCS = ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md")),
        "launch/README.md", "docker/README.md"]
OTHER_LANGUAGES = {"python", "py", "yaml", "yml", "json", "jsonl", "toml", "ini", "diff", "dockerfile"}
LAUNCHER_MODES = {"launch/single_node.sh": "local", "launch/multi_node.sh": "hostfile",
                  "launch/torchrun_multi_node.sh": "torchrun", "launch/slurm.sbatch": "slurm"}
FAKE_ALLOCATION = {"SLURM_JOB_NODELIST": "node[1-2]", "SLURM_JOB_ID": "1", "SLURM_GPUS_ON_NODE": "8",
                   "SLURM_CPUS_ON_NODE": "64"}
SHELL_VARIABLE = re.compile(r"\$(?:[A-Z_][A-Z0-9_]*\b|\{[A-Z_][A-Z0-9_]*(?:\[[@*]\])?\}|\()")
SYNOPSIS = re.compile(r"^\[|<[^<>\s]+>")
OPERATORS = {";", ";;", "&", "&&", "|", "||", ">", ">>", "<", "<<", "(", ")", "2>", "&>"}
ENV_WORD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


@dataclass
class Command:
    where: str  # file:line
    text: str  # the command line as the docs write it (continuations joined)
    inline: bool = False  # an inline code span in prose: a command only if it begins with one


@dataclass
class Invocation:
    kind: str  # "app" | "module" | "launcher" | "unreadable" (a shell could not split it)
    args: list[str]  # the app's arguments, or the launcher's arguments after the script
    env: dict[str, str] = field(default_factory=dict)
    module: str = "train"
    script: str = ""  # launcher: launch/launch.py or a wrapper
    direct: bool = False  # launcher run without an interpreter in front


def strip_comment(line: str) -> str:
    """`line` without a `#` comment: a `#` that starts a word outside quotes (as a POSIX shell reads it)."""
    quote, escaped = None, False
    for i, c in enumerate(line):
        if escaped:
            escaped = False
        elif c == "\\" and quote != "'":
            escaped = True
        elif quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def logical_lines(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """(first line number, text) of each command: comments dropped, `\\`-continued lines joined."""
    out, buf, start = [], "", None
    for lineno, raw in lines:
        text = strip_comment(raw).rstrip()
        if start is None:
            start = lineno
        if text.endswith("\\"):
            buf += text[:-1] + " "
            continue
        buf += text
        if buf.strip():
            out.append((start, buf.strip()))
        buf, start = "", None
    if buf.strip():
        out.append((start, buf.strip()))
    return out


def extract_commands(path: str, text: str) -> list[Command]:
    """Candidate command lines of a Markdown file: code blocks (fenced, indented) and inline code spans."""
    commands: list[Command] = []
    lines = text.splitlines()
    block: list[tuple[int, str]] = []
    fence, fence_lang, indented, prev_blank = None, "", False, True

    def flush():
        if block and fence_lang not in OTHER_LANGUAGES:
            commands.extend(Command(f"{path}:{n}", t) for n, t in logical_lines(block))
        block.clear()

    for lineno, line in enumerate(lines, 1):
        stripped = line.strip()
        if fence is not None:
            if stripped.startswith(fence):
                flush()
                fence = None
            else:
                block.append((lineno, line))
            continue
        m = re.match(r"^\s{0,3}(`{3,}|~{3,})\s*([\w+-]*)", line)
        if m:
            if indented:
                flush()
                indented = False
            fence, fence_lang = m.group(1), m.group(2).lower()
            continue
        if line.startswith("    ") and (indented or prev_blank) and stripped:
            indented, fence_lang = True, ""
            block.append((lineno, line[4:]))
            continue
        if indented and not stripped:
            continue  # a blank line inside an indented block
        if indented:
            flush()
            indented = False
        prev_blank = not stripped
        for span in re.findall(r"`([^`\n]+)`", line):
            commands.append(Command(f"{path}:{lineno}", span.strip(), inline=True))
    flush()
    return commands


def words_of(text: str) -> list[list[str]]:
    """The simple commands of a line, each split into words like a POSIX shell (quotes removed)."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|<>()")
    lexer.whitespace_split = True
    lexer.commenters = ""
    commands, current = [], []
    for word in lexer:
        if word in OPERATORS or set(word) <= set(";&|<>()"):
            commands.append(current)
            current = []
        else:
            current.append(word)
    return [c for c in [*commands, current] if c]


def is_python(word: str) -> bool:
    return re.fullmatch(r"python[0-9.]*", os.path.basename(word)) is not None


def launcher_script(word: str) -> str | None:
    norm = os.path.normpath(word)
    return norm if norm == "launch/launch.py" or norm in LAUNCHER_MODES else None


def find_invocation(words: list[str], inline: bool) -> Invocation | None:
    """The trainer invocation in one simple command, or None."""
    env = {}
    while words and ENV_WORD.match(words[0]):
        key, _, value = words[0].partition("=")
        env[key] = value
        words = words[1:]
    if not words:
        return None
    starts = range(1) if inline else range(len(words))  # an inline span must begin with the command
    for i in starts:
        w, rest = words[i], words[i + 1:]
        if is_python(w) and len(rest) >= 2 and rest[0] == "-m":
            if rest[1] == "train":
                return Invocation("app", rest[2:], env)
            if rest[1].startswith("train."):
                return Invocation("module", rest[2:], env, module=rest[1])
            if rest[1] in ("torch.distributed.run", "deepspeed.launcher.runner"):
                return module_of_runner(rest[2:], env)
        if is_python(w) and rest and launcher_script(rest[0]):
            return Invocation("launcher", rest[1:], env, script=launcher_script(rest[0]))
        if w in ("bash", "sh") and rest and launcher_script(rest[0]):
            return Invocation("launcher", rest[1:], env, script=launcher_script(rest[0]))
        if w == "sbatch":
            for j, r in enumerate(rest):
                if launcher_script(r):
                    return Invocation("launcher", rest[j + 1:], env, script=launcher_script(r))
                if not r.startswith("-"):
                    break
        if launcher_script(w) and not (inline and not rest):  # inline, a bare path names the file
            return Invocation("launcher", rest, env, script=launcher_script(w), direct=True)
        if w == "make" and "train" in rest:
            args = [a.partition("=")[2] for a in rest if a.startswith("ARGS=")]
            return Invocation("app", shlex.split(args[-1]) if args else [], env)
        if w in ("deepspeed", "torchrun"):
            return module_of_runner(rest, env)
    return None


def module_of_runner(rest: list[str], env: dict[str, str]) -> Invocation | None:
    """deepspeed/torchrun: the arguments after `--module train` / `-m train`."""
    for j in range(len(rest) - 1):
        if rest[j] in ("-m", "--module") and rest[j + 1] == "train":
            return Invocation("app", rest[j + 2:], env)
    return None


def invocations(commands: list[Command]) -> list[tuple[Command, Invocation]]:
    found = []
    for cmd in commands:
        try:
            simple_commands = words_of(cmd.text)
        except ValueError as e:  # e.g. a quote left open: a shell would not run it either
            if re.search(r"-m train|make train|launch/|deepspeed|torchrun", cmd.text):
                found.append((cmd, Invocation("unreadable", [str(e)])))
            continue
        for words in simple_commands:
            inv = find_invocation(words, cmd.inline)
            if inv is not None:
                found.append((cmd, inv))
    return found


def collect() -> list[tuple[Command, Invocation]]:
    return [found for path in DOCS for found in invocations(extract_commands(path, (ROOT / path).read_text()))]


def app_overrides(args: list[str]) -> list[str]:
    """The overrides Hydra's own command-line parser finds among the app's arguments; under
    ``--multirun``, the overrides of each job the sweep expands to (every job must compose)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = get_args_parser().parse_args(args)
    except SystemExit as e:
        raise AssertionError(f"Hydra's command line rejects {shlex.join(args)}") from e
    if not parsed.multirun:
        return parsed.overrides
    jobs = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(parsed.overrides), None)
    return [job for batch in jobs for job in batch]


def check_overrides(overrides: list) -> None:
    """Hydra's override parser accepts each override and they compose against conf/ into the typed
    config; a list of lists is a sweep's jobs, each checked."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from tests.utils import compose_train_config

    if overrides and isinstance(overrides[0], list):
        for job in overrides:
            check_overrides(job)
        return
    OverridesParser.create().parse_overrides(overrides)
    compose_train_config(overrides)


def run_launcher(inv: Invocation, tmp_path: Path) -> list[str]:
    """Run the launcher with --dry-run (it must succeed); returns the Hydra overrides it passes on."""
    mode = LAUNCHER_MODES.get(inv.script)
    args = list(inv.args)
    if "--hostfile" in args:
        i = args.index("--hostfile") + 1
        if i < len(args) and not (ROOT / args[i]).exists():
            hostfile = tmp_path / "hostfile"
            hostfile.write_text("node1 slots=8\nnode2 slots=8\n")
            args[i] = str(hostfile)
    parsed = launch.build_parser().parse_args(args if mode is None else [mode, *args])
    env = {**os.environ, "PYTHON": sys.executable, "MSA_REPO": str(ROOT)}
    if inv.script == "launch/slurm.sbatch" or parsed.mode == "slurm":
        env.update({k: v for k, v in FAKE_ALLOCATION.items() if k not in inv.env})
    env.update(inv.env)
    script = ROOT / inv.script
    if inv.direct:
        assert os.access(script, os.X_OK), f"{inv.script} is run directly but is not executable"
    interpreter = [sys.executable] if inv.script.endswith(".py") else ["bash"]
    proc = subprocess.run([*interpreter, str(script), *args, "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, f"{inv.script} --dry-run failed:\n{proc.stderr[-2000:]}"
    return parsed.overrides


def skip_reason(inv: Invocation) -> str | None:
    for word in inv.args:
        if SHELL_VARIABLE.search(word):
            return f"template: {word!r} is filled in by the reader"
        if SYNOPSIS.search(word):
            return f"synopsis: {word!r}"
    return None


FOUND = collect()


def test_docs_show_commands():
    """Guard against an extractor that silently finds nothing."""
    files = {cmd.where.rsplit(":", 1)[0] for cmd, _ in FOUND}
    assert {"README.md", "launch/README.md", "docker/README.md"} <= files, files
    kinds = {inv.kind for _, inv in FOUND}
    assert {"app", "launcher"} <= kinds, kinds


@pytest.mark.parametrize("cmd, inv", FOUND, ids=[f"{c.where} {i.kind}" for c, i in FOUND])
def test_doc_command_runs_as_written(cmd, inv, tmp_path):
    reason = skip_reason(inv)
    if reason:
        pytest.skip(f"{cmd.where}: {reason}")
    assert inv.kind != "unreadable", f"{cmd.where}: `{cmd.text}`: {inv.args[0]}"
    try:
        if inv.kind == "module":
            import importlib.util

            assert importlib.util.find_spec(inv.module) is not None, f"no module {inv.module}"
            return
        overrides = run_launcher(inv, tmp_path) if inv.kind == "launcher" else app_overrides(inv.args)
        check_overrides(overrides)
    except Exception as e:
        raise AssertionError(f"{cmd.where}: `{cmd.text}` does not run as written:\n{type(e).__name__}: {e}") from e


@pytest.mark.parametrize("text, ok", [
    (""".venv/bin/python -m train data.shards='/data/shards/{000000..000099}.tar' run_dir=r""", False),
    (""".venv/bin/python -m train "data.shards='/data/shards/{000000..000099}.tar'" run_dir=r""", True),
    ("""python -m train data.shards=/data/shards/{000..009}.tar""", False),
    ("""python -m train model=tiny attention.no_such_key=1""", False),
    ("""make train ARGS="model=small 'data.shards=/d/{0..9}.tar'" """, False),
    ("""make train ARGS="model=small \\"data.shards='/d/{0..9}.tar'\\"" """, True),
])
def test_checker_catches_an_unquoted_brace_pattern(text, ok, tmp_path):
    """The check itself: a brace pattern that reaches Hydra without its quotes fails, as does a key
    that does not exist; the quoted forms pass."""
    (cmd_inv,) = invocations([Command("example:1", text)])
    overrides = app_overrides(cmd_inv[1].args)
    if ok:
        check_overrides(overrides)
    else:
        with pytest.raises(Exception, match=r"mismatched input '\{'|no_such_key|Could not override"):
            check_overrides(overrides)


def test_extraction_rules():
    md = "\n".join([
        "Text with `python -m train model=small` inline and a file `launch/launch.py`.",
        "",
        "```bash",
        "FOO=1 python -m train \\",
        "    a=1 b='x y'   # comment",
        "cd /x && torchrun --nproc-per-node 2 -m train c=3 | tee log",
        "deepspeed --num_gpus 2 --no_local_rank --module train d='#4'  # the rank reads LOCAL_RANK",
        "SLURM_JOB_ID=7 sbatch --nodes=4 launch/slurm.sbatch --gpus 8 run_dir=$RUN",
        "```",
        "```python",
        "python -m train never=checked",
        "```",
        "",
        "    docker run -v $PWD:/w img python launch/launch.py local --gpus 8 run_dir=r",
        "",
    ])
    commands = extract_commands("x.md", md)
    found = [(c.where, i.kind, i.args, i.env) for c, i in invocations(commands)]
    assert found == [
        ("x.md:1", "app", ["model=small"], {}),
        ("x.md:4", "app", ["a=1", "b=x y"], {"FOO": "1"}),
        ("x.md:6", "app", ["c=3"], {}),
        ("x.md:7", "app", ["d=#4"], {}),
        ("x.md:8", "launcher", ["--gpus", "8", "run_dir=$RUN"], {"SLURM_JOB_ID": "7"}),
        ("x.md:14", "launcher", ["local", "--gpus", "8", "run_dir=r"], {}),
    ], found
    assert "template" in skip_reason(invocations(commands)[4][1])
