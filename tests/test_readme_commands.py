"""The commands that README.md and docs/*.md show still work.

Every command line in the docs' fenced shell blocks (``fusion-vlm ...``, the launchers and thin scripts that
take ``fusion-vlm train`` / ``eval`` arguments, ``scripts/demo.sh``) is parsed by the real parser
(:func:`fusion_vlm.cli.build_parser`); a flag or subcommand that does not exist fails the test naming the doc
file and line. Named configs, ``--set`` overrides, repository paths, ``python scripts/X.py`` flags and
``python -m`` modules are checked too. Then the fast README commands run for real (taken from README's own
text) and their output must show the figures README states.
"""

from __future__ import annotations

import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest

from fusion_vlm.cli import build_parser

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_LANGS = {"", "bash", "sh", "shell", "console"}
REPO_DIRS = ("tests", "configs", "scripts", "eval", "train", "docs", "fusion_vlm")
# programs that take the arguments of a fusion-vlm subcommand
AS_SUBCOMMAND = {"scripts/launch_node.sh": ["train"], "scripts/launch_multinode.sh": ["train"],
                 "train/train.py": ["train"], "eval/run_vlmeval.py": ["eval"], "scripts/demo.sh": ["demo"],
                 "scripts/sweep_stage3.sh": ["train", "--config", "stage3_finetune"]}
ENV_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=.*")


@dataclass
class DocCommand:
    """One command line of a doc: ``where`` is ``file:line`` (first physical line), ``tokens`` its words."""

    where: str
    text: str
    tokens: list[str]


def shown(path: Path) -> Path:
    """``path`` relative to the repository when inside it (for messages)."""
    return path.relative_to(REPO) if path.is_relative_to(REPO) else path


def fenced_blocks(path: Path) -> list[tuple[str, int, list[str]]]:
    """(language, line number of the first content line, lines) of every fenced code block of ``path``."""
    blocks, lang, start, lines = [], None, 0, []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        fence = re.match(r"\s*```\s*([\w+-]*)", line)
        if fence and lang is None:
            lang, start, lines = fence.group(1).lower(), i + 1, []
        elif fence:
            blocks.append((lang, start, lines))
            lang = None
        elif lang is not None:
            lines.append(line)
    return blocks


def doc_commands(path: Path) -> list[DocCommand]:
    """The command lines of ``path``'s shell blocks: ``\\`` continuations joined, ``$ `` prompts, comments,
    heredoc bodies and leading ``VAR=value`` assignments / ``bash`` / ``exec`` removed."""
    rel, out = shown(path), []
    for lang, start, lines in fenced_blocks(path):
        if lang not in SHELL_LANGS:
            continue
        i, heredoc = 0, None
        while i < len(lines):
            first = i
            text = lines[i]
            while text.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                text = text.rstrip()[:-1] + " " + lines[i].strip()
            i += 1
            if heredoc is not None:
                heredoc = None if text.strip() == heredoc else heredoc
                continue
            text = re.sub(r"^\s*\$ ", "", text)
            end = re.search(r"<<-?\s*'?(\w+)'?", text)
            if end:
                heredoc = end.group(1)
            try:
                tokens = shlex.split(text, comments=True)
            except ValueError as err:
                out.append(DocCommand(f"{rel}:{start + first}", text.strip(), [f"<unparsable: {err}>"]))
                continue
            while tokens and (ENV_ASSIGNMENT.fullmatch(tokens[0]) or tokens[0] in ("bash", "exec")):
                tokens.pop(0)
            if tokens:
                out.append(DocCommand(f"{rel}:{start + first}", text.split(" #")[0].strip(), tokens))
    return out


def split_optional(tokens: list[str]) -> tuple[list[str], list[str]]:
    """Separate ``[--flag value]`` groups (written as optional in the docs) from the rest."""
    required, optional, depth = [], [], 0
    for tok in tokens:
        opens = tok.startswith("[")
        depth += opens
        (optional if depth else required).append(tok[1:] if opens else tok)
        if depth and tok.endswith("]"):
            optional[-1] = optional[-1][:-1]
            depth -= 1
    return required, optional


def subparser(parser, name: str):
    """The argparse parser of subcommand ``name`` (None when there is none)."""
    for action in parser._subparsers._group_actions:
        if name in action.choices:
            return action.choices[name]
    return None


def is_flag(tok: str) -> bool:
    return tok.startswith("-") and not re.match(r"-\d", tok) and tok != "-"


def unknown_flags(sub, tokens: list[str]) -> list[str]:
    """Flags among ``tokens`` that ``sub`` does not define."""
    known = set(sub._option_string_actions)
    return [t for t in tokens if is_flag(t) and t.split("=")[0] not in known]


def parse(parser, argv: list[str]):
    """``(namespace, None)``, or ``(None, argparse's error line)`` when argparse rejects ``argv``."""
    err = io.StringIO()
    with redirect_stderr(err), redirect_stdout(io.StringIO()):
        try:
            return parser.parse_args(argv), None
        except SystemExit:
            lines = err.getvalue().strip().splitlines()
            return None, lines[-1] if lines else "argparse exited"


def train_overrides(args) -> list[str]:
    """The ``key=value`` overrides that ``fusion-vlm train`` makes of its parsed flags."""
    from fusion_vlm import schema
    from fusion_vlm.commands import train as train_command

    if hasattr(schema, "overrides_from_namespace"):  # flags generated from the config schema
        from fusion_vlm.training.config import TrainConfig

        return schema.overrides_from_namespace(args, TrainConfig)
    if hasattr(train_command, "overrides_from_args"):  # hand-written flags
        return train_command.overrides_from_args(args)
    return list(getattr(args, "overrides", []))


def config_problem(args) -> str | None:
    """Load the config that a parsed train / memory / info / walkthrough / tokens line names (with --set)."""
    from fusion_vlm.config import load_model_config, resolve_config_path
    from fusion_vlm.training.config import load_train_config

    if getattr(args, "config", None) is None:
        return None
    try:
        if args.command == "train":
            load_train_config(args.config, train_overrides(args))
        elif args.command == "memory":
            load_train_config(args.config, args.overrides)
        elif args.command in ("info", "walkthrough"):
            load_model_config(args.config, getattr(args, "overrides", []))
        elif args.command == "tokens":
            resolve_config_path(args.config)
    except Exception as err:  # noqa: BLE001 -- any failure to load is the doc's problem here
        return f"{type(err).__name__}: {err}"
    return None


def command_problems(parser, cmd: DocCommand) -> list[str]:
    """What is wrong with one doc command line (empty: nothing)."""
    problems = []
    tokens = list(cmd.tokens)
    for tok in tokens:  # paths into the repository must exist (not ones under runs/, data/, ...)
        path = tok.strip("[]'\"")
        if path.startswith("shared/"):
            problems.append(f"{path}: a path outside the repository")
        elif path.split("/")[0] in REPO_DIRS and "/" in path and not re.search(r"[*?{}<>]", path) \
                and not (REPO / path).exists():
            problems.append(f"{path}: no such file in the repository")
    program = tokens[0]
    if program.endswith("python") or program.endswith("python3"):
        rest = tokens[1:]
        if rest[:1] == ["-m"]:
            module = rest[1]
            try:
                found = importlib.util.find_spec(module) is not None
            except ModuleNotFoundError:  # a missing parent package
                found = False
            if not found:
                problems.append(f"python -m {module}: no such module")
            return problems
        program, tokens = rest[0], rest
        if program.endswith(".py") and program not in AS_SUBCOMMAND:
            source = (REPO / program).read_text() if (REPO / program).is_file() else ""
            if not source:
                problems.append(f"{program}: no such script")
            problems += [f"{program}: no option {t}" for t in tokens[1:]
                         if is_flag(t) and f'"{t.split("=")[0]}"' not in source]
            return problems
    if program.startswith("scripts/") and not os.access(REPO / program, os.X_OK):
        problems.append(f"{program}: missing or not executable")
    if program == "fusion-vlm":
        argv = tokens[1:]
    elif program in AS_SUBCOMMAND:
        argv = AS_SUBCOMMAND[program] + tokens[1:]
    else:
        return problems
    required, optional = split_optional(argv)
    if not required or required[0].startswith("-"):
        return problems + [f"no fusion-vlm subcommand in {' '.join(argv)!r}"]
    sub = subparser(parser, required[0])
    if sub is None:
        return problems + [f"fusion-vlm has no subcommand {required[0]!r}"]
    problems += [f"fusion-vlm {required[0]} has no option {t}" for t in unknown_flags(sub, optional)]
    if "..." in required:  # an elided example: only its flags can be checked
        return problems + [f"fusion-vlm {required[0]} has no option {t}"
                           for t in unknown_flags(sub, required)]
    args, error = parse(parser, required)
    if error:
        return problems + [error]
    # argparse accepts a prefix of a long option; a doc spells the option out
    problems += [f"fusion-vlm {required[0]}: {t} is not the full option name" for t in unknown_flags(sub, required)]
    problem = config_problem(args)
    return problems + ([problem] if problem else [])


def inline_problems(parser, path: Path) -> list[str]:
    """Problems of ``fusion-vlm SUB --flag`` spans in the prose: the subcommand and its flags must exist."""
    rel, out = shown(path), []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        for span in re.findall(r"`fusion-vlm ([^`]+)`", line):
            words = span.split()
            if words[0].isupper() or words[0].startswith("-"):  # `fusion-vlm COMMAND: error: ...`
                continue
            sub, rest = subparser(parser, words[0]), words[1:]
            while sub is not None and sub._subparsers is not None and rest and subparser(sub, rest[0]) is not None:
                sub, rest = subparser(sub, rest[0]), rest[1:]  # nested: `fusion-vlm standins make --out`
            if sub is None:
                out.append(f"{rel}:{i}: `fusion-vlm {span}`: no subcommand {words[0]!r}")
            else:
                out += [f"{rel}:{i}: `fusion-vlm {span}`: no option {t}" for t in unknown_flags(sub, rest)]
    return out


def doc_problems(path: Path) -> list[str]:
    """Every problem of every command of one doc, each line naming file:line and the command."""
    parser = build_parser()
    out = []
    cwd = os.getcwd()
    os.chdir(REPO)  # configs and paths in the docs are relative to the repository root
    try:
        for cmd in doc_commands(path):
            out += [f"{cmd.where}: `{cmd.text}`: {p}" for p in command_problems(parser, cmd)]
    finally:
        os.chdir(cwd)
    return out + inline_problems(parser, path)


# ---------------------------------------------------------------- the docs parse

@pytest.mark.parametrize("doc", DOCS, ids=[str(p.relative_to(REPO)) for p in DOCS])
def test_doc_commands_parse(doc):
    problems = doc_problems(doc)
    assert not problems, "doc commands that do not work:\n" + "\n".join(problems)


def test_collector_finds_the_commands():
    readme = doc_commands(REPO / "README.md")
    fv = [c for c in readme if c.tokens[0] == "fusion-vlm"]
    assert len(fv) >= 10 and {c.tokens[1] for c in fv} >= {"info", "memory", "eval", "sweep", "generate", "fit",
                                                              "divergence", "tokens"}
    joined = [c for c in readme if c.tokens[:3] == ["scripts/launch_node.sh", "--config", "stage2_generation"]]
    assert joined and joined[0].tokens[-2:] == ["--output-dir", "runs/stage2_generation"]  # `\` continuation
    sweep = [c for c in readme if c.tokens[0] == "scripts/sweep_stage3.sh"]
    assert sweep and sweep[0].tokens == ["scripts/sweep_stage3.sh"]  # env assignments and comment gone
    every = sum(len(doc_commands(p)) for p in DOCS)
    assert every >= 50, every


def test_readme_opens_with_the_two_scripts():
    lang, _, lines = fenced_blocks(REPO / "README.md")[0]
    assert lang == "bash"
    commands = [shlex.split(line, comments=True) for line in lines]
    assert [c for c in commands if c] == [["scripts/demo.sh"], ["scripts/test.sh"]]
    for script in ("scripts/demo.sh", "scripts/test.sh"):
        assert (REPO / script).is_file() and os.access(REPO / script, os.X_OK), script


BROKEN_DOC = """# a doc
```bash
fusion-vlm info --config paper --no-such-flag 3     # bogus flag
HF_HUB_OFFLINE=1 fusion-vlm fit --csv scores.csv \\
    --n-boot 0 --out runs/x
fusion-vlm teleport --now
scripts/launch_node.sh --config stage2_generation --warp-speed
fusion-vlm info --config no_such_preset
fusion-vlm info --config paper --set fusion.no_such_field=1
fusion-vlm generate --checkpoint c --image a.png [--no-such-option]
fusion-vlm fit --csv tests/data/no_such_file.csv
python scripts/bench_memory.py --no-such-bench-flag
python -m fusion_vlm.no_such_module
fusion-vlm info --conf paper
```
Prose: `fusion-vlm sweep --no-such-prose-flag`.
"""


def test_the_check_catches_broken_doc_lines(tmp_path):
    doc = tmp_path / "README.md"
    doc.write_text(BROKEN_DOC)
    parser = build_parser()
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        found = {c.where.split(":")[-1]: command_problems(parser, c) for c in doc_commands(doc)}
    finally:
        os.chdir(cwd)
    assert "unrecognized arguments: --no-such-flag 3" in found["3"][0]
    assert found["4"] == []  # env assignment + continuation: a valid line
    assert found["6"] == ["fusion-vlm has no subcommand 'teleport'"]
    assert "unrecognized arguments: --warp-speed" in found["7"][0]
    assert "no_such_preset" in found["8"][0]
    assert "no_such_field" in found["9"][0]
    assert found["10"] == ["fusion-vlm generate has no option --no-such-option"]
    assert found["11"] == ["tests/data/no_such_file.csv: no such file in the repository"]
    assert found["12"] == ["scripts/bench_memory.py: no option --no-such-bench-flag"]
    assert found["13"] == ["python -m fusion_vlm.no_such_module: no such module"]
    assert found["14"] == ["fusion-vlm info: --conf is not the full option name"]  # argparse took it for --config
    assert inline_problems(parser, doc) == [
        f"{doc}:16: `fusion-vlm sweep --no-such-prose-flag`: no option --no-such-prose-flag"]


# ---------------------------------------------------------------- the fast README commands run

def readme_command(*prefix: str) -> DocCommand:
    """The README command line whose words start with ``prefix`` (fails if README no longer shows one)."""
    found = [c for c in doc_commands(REPO / "README.md") if c.tokens[:len(prefix)] == list(prefix)]
    assert found, f"README.md no longer shows a `{' '.join(prefix)} ...` command"
    return found[0]


def readme_figure(pattern: str) -> str:
    """A figure README states (first group of ``pattern`` in README's text)."""
    m = re.search(pattern, (REPO / "README.md").read_text())
    assert m, f"README.md no longer states /{pattern}/"
    return m.group(1)


def test_fast_readme_commands_run(tmp_path):
    """info (meta device, twice), tokens and fit, as README writes them, run concurrently in a scratch folder
    that sees the repository's configs/ and tests/ (so README's relative paths work and outputs stay there)."""
    for name in ("configs", "tests"):
        (tmp_path / name).symlink_to(REPO / name)
    exe = Path(sys.executable).parent / "fusion-vlm"
    assert exe.is_file(), f"no console script at {exe}"
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false")
    runs = {
        "info": readme_command("fusion-vlm", "info", "--config", "configs/model/paper.yaml", "--device", "meta"),
        "info_set": readme_command("fusion-vlm", "info", "--config", "paper", "--set"),
        "tokens": readme_command("fusion-vlm", "tokens", "--size"),
        "fit": readme_command("fusion-vlm", "fit", "--csv", "tests/data/paper_appendix_scores.csv"),
    }
    procs = {k: subprocess.Popen([str(exe), *c.tokens[1:]], cwd=tmp_path, env=env, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE) for k, c in runs.items()}
    out = {}
    for key, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        where = f"{runs[key].where}: `{runs[key].text}`"
        assert proc.returncode == 0, f"{where} exited {proc.returncode}:\n{stderr[-2000:]}"
        out[key] = stdout

    # info: 1450 vision tokens after the merge and the parameter counts README gives
    assert re.search(r"vision tokens after merge 10 x 145 = (\d+)", out["info"]).group(1) \
        == readme_figure(r"merge\s+\((\d+) for any 4:3")
    params = {m.group(1): int(m.group(2).replace(",", ""))
              for m in re.finditer(r"^(\w+)\s+([\d,]+)\s+[\d,]+$", out["info"], flags=re.M)}
    assert f"{(params['vision'] + params['vision_adapter']) / 1e6:.1f}" == readme_figure(r"vision tower ([\d.]+)M")
    assert f"{params['fusion'] / 1e6:.1f}" == readme_figure(r"fusion ([\d.]+)M")
    assert f"{params['llm'] / 1e9:.2f}" == readme_figure(r"Llama-2-7B ([\d.]+)B")
    # info --set: the override reaches the model (N = 64 fused tokens for the question)
    n = re.search(r"fusion\.n_queries=(\d+)", runs["info_set"].text).group(1)
    assert f"fused tokens per question [{n}]" in out["info_set"]
    # tokens: the models README names, and LLaVA-1.5's 576 tokens (24 x 24 patches of a 336-px CLIP)
    rows = {line.split()[0]: line.split() for line in out["tokens"].splitlines() if line.strip()}
    assert {"llava-1.5", "llava-next", "llava-onevision", "qwen2-vl", "qwen2.5-vl", "qwen3-vl", "gemma3",
            "fusion-vlm"} <= rows.keys()
    assert rows["llava-1.5"][1] == "576"
    # fit: every b of docs/analysis.md's Table-1 table (the paper's Table 1) from the written fits.csv
    fit_dir = tmp_path / runs["fit"].tokens[runs["fit"].tokens.index("--out") + 1]
    fits = {(r[0], r[1]): float(r[3]) for r in
            (line.split(",") for line in (fit_dir / "fits.csv").read_text().splitlines()[1:])}
    table = re.findall(r"^\| (\S[^|]*?) \| (?:\*\*)?(-?\d\.\d{4}) \[[^|]*\| [\d.]+ \| (?:\*\*)?(-?\d\.\d{4}) \[",
                       (REPO / "docs/analysis.md").read_text(), flags=re.M)
    assert len(table) >= 18, table  # the 18 metrics that have both vqq and vq_ft in the appendix
    for metric, b_vqq, b_vq_ft in table:
        assert f"{fits[(metric, 'vqq')]:.4f}" == b_vqq, metric
        assert f"{fits[(metric, 'vq_ft')]:.4f}" == b_vq_ft, metric
