"""The documentation cannot drift from the code: README.md and docs/*.md are read as a newcomer would
follow them, without running anything heavy.

- Every relative link (and image) points to a file of this checkout, and every `#anchor` to a
  heading of its target (GitHub's heading slugs).
- Every command line in a ```bash / ```sh / ```console block that runs something of this
  repository (scripts/*.sh, `python -m <module>`, `python <path>.py`, clients/*.py, the console
  scripts of pyproject.toml, `torchrun -m <module>`) names a file that exists, and every `--flag`
  it passes (in a trailing comment too) is one that script defines: a Python entry point's argparse
  `add_argument` calls (`--no-X` where `--X` is a `BooleanOptionalAction`), a shell script's text.
  Paths of the repository named in those commands exist; `docker build --target` names a stage of
  the Dockerfile.
- ```python blocks import only what the repository defines, and name only the ensemble's tensors.
- The tensors, metrics and pages the docs describe exist: the ensemble's contract table matches
  model_repository/sdxl/config.pbtxt, every `distrifusion_*` metric is one the code exports, every
  docs page opens with what its reader will be able to do, and README.md links every page.
- README.md stays short enough to read in five minutes.

Nothing here imports torch or starts a process.
"""

from __future__ import annotations

import ast
import functools
import re
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOC_PAGES = sorted((ROOT / "docs").glob("*.md"))
DOCUMENTS = [README, *DOC_PAGES]
README_MAX_LINES = 160
LEAD = "After reading this page you will be able to"

# Where `python -m` finds this repository's modules (pyproject.toml's packages.find: backend/ and
# the checkout's top level).
MODULE_ROOTS = (ROOT / "backend", ROOT)
SHELL_BLOCKS = {"bash", "sh", "shell", "console"}
SEPARATORS = {"&&", "||", ";", "|", "&"}
PYTHON = re.compile(r"^(?:.*/)?python(?:3(?:\.\d+)?)?$")
# Source folders whose paths, named in a command, must exist (build outputs, caches and the trained
# demo model's weights are made by the commands themselves, so they are not checked).
SOURCE_FOLDERS = (
    "backend",
    "benchmarks",
    "build_engines",
    "clients",
    "deploy",
    "docs",
    "model_repository",
    "scripts",
    "tests",
)
# scripts/perf_analyzer.sh hands every argument to perf_analyzer, whose flags are in no file here:
# they are checked against the perf_analyzer command lines that the serving benchmarks run
# (benchmarks/serving_common.py and the scripts; tests/test_perf_analyzer.py runs them).
FORWARDED = {"scripts/perf_analyzer.sh": ("benchmarks/*.py", "tests/test_perf_analyzer.py")}


def relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


# ---------------------------------------------------------------------------------------------------
# Reading markdown


@dataclass(frozen=True)
class Block:
    language: str
    lines: tuple[str, ...]
    line: int  # 1-based line of the opening fence


@dataclass(frozen=True)
class Markdown:
    prose: tuple[tuple[int, str], ...]  # (1-based line number, text) outside fenced blocks
    blocks: tuple[Block, ...]


FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")


@functools.cache
def read_markdown(path: Path) -> Markdown:
    prose: list[tuple[int, str]] = []
    blocks: list[Block] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            prose.append((index + 1, lines[index]))
            index += 1
            continue
        indent, fence, language = opening.groups()
        body: list[str] = []
        start = index + 1
        index += 1
        while index < len(lines) and not lines[index].strip().startswith(fence):
            line = lines[index]
            body.append(line[len(indent) :] if line.startswith(indent) else line.lstrip())
            index += 1
        assert index < len(lines), f"{relative(path)}:{start}: fenced block never closed"
        blocks.append(Block(language.lower(), tuple(body), start))
        index += 1
    return Markdown(tuple(prose), tuple(blocks))


CODE_SPAN = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def links_in(text: str) -> list[str]:
    """The link and image targets of a line of prose; a link inside a code span is text."""
    return LINK.findall(CODE_SPAN.sub(lambda match: match.group(0).replace("](", "] ("), text))


def links(path: Path) -> list[tuple[int, str]]:
    return [(number, target) for number, text in read_markdown(path).prose for target in links_in(text)]


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: its rendered text, lower case, without punctuation."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links: their text
    text = text.replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@functools.cache
def anchors(path: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    result = set()
    for _, text in read_markdown(path).prose:
        match = HEADING.match(text)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return frozenset(result)


# ---------------------------------------------------------------------------------------------------
# Links


@pytest.mark.parametrize("document", DOCUMENTS, ids=relative)
def test_every_relative_link_points_to_an_existing_file_and_heading(document: Path) -> None:
    problems = []
    found = links(document)
    for number, target in found:
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        path_part, _, anchor = target.partition("#")
        where = f"{relative(document)}:{number}: {target}"
        destination = (document.parent / path_part).resolve() if path_part else document
        if ROOT not in destination.parents and destination != ROOT:
            problems.append(f"{where}: leaves the checkout")
        elif not destination.exists():
            problems.append(f"{where}: no such file")
        elif anchor:
            if destination.suffix != ".md":
                problems.append(f"{where}: an anchor into a file that is not markdown")
            elif anchor not in anchors(destination):
                problems.append(f"{where}: no heading #{anchor} in {relative(destination)}")
    assert not problems, "\n".join(problems)


def test_readme_links_every_docs_page() -> None:
    linked = {(README.parent / target.partition("#")[0]).resolve() for _, target in links(README) if target}
    missing = [relative(page) for page in DOC_PAGES if page.resolve() not in linked]
    assert not missing, f"README.md does not link {missing}"


def test_the_link_reader_reads_what_github_renders() -> None:
    """The helpers above, on the constructs the docs use."""
    assert slug("The UNet stage's settings") == "the-unet-stages-settings"
    assert slug("Configuration (`DistriConfig`)") == "configuration-districonfig"
    assert slug("GPU: full-size SDXL UNet, one GPU (`benchmarks/gpu_sdxl_unet.py`)") == (
        "gpu-full-size-sdxl-unet-one-gpu-benchmarksgpu_sdxl_unetpy"
    )
    line = "see [the `x` page](docs/x.md#a-b), ![alt](img.png) and `[not](a-link.md)`"
    assert links_in(line) == ["docs/x.md#a-b", "img.png"]


# ---------------------------------------------------------------------------------------------------
# Commands


@dataclass(frozen=True)
class Command:
    document: Path
    line: int
    tokens: tuple[str, ...]
    comment: tuple[str, ...]  # the tokens of a trailing `# ...` comment

    @property
    def where(self) -> str:
        return f"{relative(self.document)}:{self.line}: {' '.join(self.tokens)}"


def shell_lines(block: Block) -> list[tuple[int, str]]:
    """The block's command lines, continuation lines joined, console prompts removed."""
    result: list[tuple[int, str]] = []
    pending = ""
    start = 0
    for offset, raw in enumerate(block.lines, start=block.line + 1):
        line = raw.rstrip()
        if block.language == "console":
            if not pending and not line.startswith("$ "):
                continue  # output
            line = line.removeprefix("$ ") if not pending else line
        if not pending:
            start = offset
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        result.append((start, pending + line))
        pending = ""
    if pending:
        result.append((start, pending))
    return result


def comment_start(line: str) -> int:
    """Where a shell comment starts in the line (a `#` that begins a word outside quotes), or its length."""
    quote = ""
    escaped = False
    for index, char in enumerate(line):
        if escaped:
            escaped = False
        elif char == "\\" and quote != "'":
            escaped = True
        elif quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1].isspace()):
            return index
    return len(line)


def split_line(line: str) -> tuple[list[list[str]], list[str]]:
    """A command line's commands (split at ; && || | &) and the words of its trailing comment."""
    start = comment_start(line)
    comment = line[start + 1 :].split()
    lexer = shlex.shlex(line[:start], posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = ""
    parts: list[list[str]] = [[]]
    for token in lexer:
        if token in SEPARATORS:
            parts.append([])
        else:
            parts[-1].append(token)
    return [part for part in parts if part], comment


def commands(document: Path) -> list[Command]:
    """Every command of the document's shell blocks; a trailing comment goes with the line's last."""
    found = []
    for block in read_markdown(document).blocks:
        if block.language not in SHELL_BLOCKS:
            continue
        for number, line in shell_lines(block):
            parts, comment = split_line(line)
            for index, part in enumerate(parts):
                last = index == len(parts) - 1
                found.append(Command(document, number, tuple(part), tuple(comment) if last else ()))
    return found


ALL_COMMANDS = [command for document in DOCUMENTS for command in commands(document)]


@functools.cache
def console_scripts() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return {name: target.partition(":")[0] for name, target in project.get("scripts", {}).items()}


@functools.cache
def repository_packages() -> frozenset[str]:
    return frozenset(
        child.name
        for root in MODULE_ROOTS
        for child in root.iterdir()
        if child.is_dir() and (child / "__init__.py").exists()
    )


def module_file(module: str) -> Path | None:
    """The file `python -m module` runs, if the module is this repository's."""
    parts = module.split(".")
    for root in MODULE_ROOTS:
        base = root.joinpath(*parts)
        for candidate in (base.with_suffix(".py"), base / "__main__.py"):
            if candidate.is_file():
                return candidate
    return None


@dataclass(frozen=True)
class Invocation:
    target: str  # what the docs name: a path or a module
    file: Path | None  # what runs, None where it does not exist
    arguments: tuple[str, ...]


def invocation(tokens: tuple[str, ...]) -> Invocation | None:
    """The repository script or module a command runs, with its arguments; None for other programs."""
    while tokens and re.match(r"^[A-Z_][A-Z0-9_]*=", tokens[0]):  # VAR=value command ...
        tokens = tokens[1:]
    if not tokens:
        return None
    program, rest = tokens[0], tokens[1:]
    if PYTHON.match(program) or program == "torchrun":
        if "-m" in rest[:-1]:
            module = rest[rest.index("-m") + 1]
            if module.split(".")[0] not in repository_packages():
                return None  # pytest, pip, ...
            return Invocation(module, module_file(module), rest[rest.index("-m") + 2 :])
        script = next((index for index, token in enumerate(rest) if token.endswith(".py")), None)
        if script is None:
            return None
        path = ROOT / rest[script]
        return Invocation(rest[script], path if path.is_file() else None, rest[script + 1 :])
    if program in ("bash", "sh") and rest and not rest[0].startswith("-"):
        program, rest = rest[0], rest[1:]
    if program in console_scripts():
        module = console_scripts()[program]
        return Invocation(f"{program} ({module})", module_file(module), rest)
    if "/" in program and program.endswith((".sh", ".py")):
        path = ROOT / program.removeprefix("./")
        return Invocation(program, path if path.is_file() else None, rest)
    return None


def flags(arguments: tuple[str, ...]) -> list[str]:
    names = []
    for argument in arguments:
        if argument == "--":
            break  # the rest belongs to the program it starts
        if re.match(r"^--[A-Za-z0-9][\w-]*", argument):
            names.append(argument.partition("=")[0])
    return names


@functools.cache
def python_flags(path: Path) -> frozenset[str]:
    """The flags of every argparse `add_argument` call in a Python file and in the repository
    modules it imports (a parser may be built by a shared helper)."""
    defined: set[str] = set()
    for source in (path, *imported_modules(path)):
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument"):
                continue
            names = [
                arg.value for arg in node.args if isinstance(arg, ast.Constant) and isinstance(arg.value, str)
            ]
            names = [name for name in names if name.startswith("--")]
            defined.update(names)
            action = next((keyword.value for keyword in node.keywords if keyword.arg == "action"), None)
            if getattr(action, "attr", None) == "BooleanOptionalAction":
                defined.update(f"--no-{name[2:]}" for name in names)
    return frozenset(defined)


def imported_modules(path: Path) -> list[Path]:
    """This repository's modules that a file imports (one level), its package's __main__ included."""
    found = []
    package = path.parent
    if path.name == "__main__.py":
        found.extend(sorted(package.glob("*.py")))
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package
                for _ in range(node.level - 1):
                    base = base.parent
                target = base.joinpath(*(node.module or "").split(".")) if node.module else base
                for candidate in (target.with_suffix(".py"), target / "__init__.py"):
                    if candidate.is_file():
                        found.append(candidate)
                continue
            names = [node.module or ""]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            if name.split(".")[0] in repository_packages() and (file := module_file(name)):
                found.append(file)
    return [file for file in dict.fromkeys(found) if file != path]


def flag_defined(flag: str, invoked: Invocation) -> bool:
    assert invoked.file is not None
    if invoked.file.suffix == ".py":
        return flag in python_flags(invoked.file)
    forwarded = FORWARDED.get(relative(invoked.file))
    if forwarded:
        files = [file for pattern in forwarded for file in sorted(ROOT.glob(pattern))]
        quoted = re.compile(rf"[\"']{re.escape(flag)}(?![\w-])")
        return any(quoted.search(file.read_text(encoding="utf-8")) for file in files)
    return re.search(rf"{re.escape(flag)}(?![\w-])", invoked.file.read_text(encoding="utf-8")) is not None


def test_the_docs_show_commands_to_check() -> None:
    """The extraction below finds the commands it is meant to check (a parser that found none
    would pass every test)."""
    targets = {invoked.target for command in ALL_COMMANDS if (invoked := invocation(command.tokens))}
    for expected in (
        "scripts/demo.sh",
        "scripts/test.sh",
        "clients/sdxl_client.py",
        "build_engines",
        "scripts/perf_analyzer.sh",
        "distrifusion.cli.generate",
    ):
        assert expected in targets, f"no documented command runs {expected}; found {sorted(targets)}"


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=lambda command: f"{command.where[:90]}")
def test_a_documented_command_runs_an_existing_script_with_flags_it_defines(command: Command) -> None:
    invoked = invocation(command.tokens)
    if invoked is None:
        return  # another program (kubectl, docker, helm, pytest, ...): see the path checks below
    assert invoked.file is not None, f"{command.where}: {invoked.target} does not exist in this checkout"
    unknown = [flag for flag in flags(invoked.arguments + command.comment) if not flag_defined(flag, invoked)]
    assert not unknown, f"{command.where}: {relative(invoked.file)} defines no {unknown}"


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=lambda command: f"{command.where[:90]}")
def test_the_repository_paths_and_image_targets_a_command_names_exist(command: Command) -> None:
    problems = []
    named = command.tokens
    if command.tokens[0] == "kubectl":  # deploy/NAME, svc/NAME, job/NAME are objects, not paths
        named = tuple(
            token
            for flag, token in zip(("", *named), named, strict=False)
            if flag in ("-k", "-f", "--filename")
        )
    for token in named:
        value = token.partition("=")[2] if token.startswith("--") and "=" in token else token
        value = value.removeprefix("./")
        repository_path = value.split("/")[0] in SOURCE_FOLDERS and "/" in value and "$" not in value
        if repository_path and not (ROOT / value).exists():
            problems.append(f"{value}: no such path")
    tokens = list(command.tokens)
    if tokens[:2] == ["docker", "build"] and "--target" in tokens:
        stage = tokens[tokens.index("--target") + 1]
        dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
        if not re.search(rf"^FROM\s+\S+\s+AS\s+{re.escape(stage)}\s*$", dockerfile, re.M | re.I):
            problems.append(f"the Dockerfile has no stage {stage}")
    assert not problems, f"{command.where}: {problems}"


def test_the_command_reader_reads_lines_as_a_shell_does() -> None:
    """The helpers above, on the constructs the docs use."""
    block = Block(
        "bash",
        (
            "FOO=1 .venv/bin/python -m build_engines --model m \\",
            "    --target cpu   # or --no-cuda-graphs",
            "kubectl -n sdxl port-forward svc/x 8001:8001 &",
            "torchrun --nproc-per-node 4 -m distrifusion.cli.generate --device cuda -- --not-ours",
        ),
        1,
    )
    lines = shell_lines(block)
    assert [number for number, _ in lines] == [2, 4, 5]
    (build,), comment = split_line(lines[0][1])
    assert comment == ["or", "--no-cuda-graphs"]
    invoked = invocation(tuple(build))
    assert invoked is not None and invoked.target == "build_engines"
    assert flags(invoked.arguments) == ["--model", "--target"]
    assert "--no-cuda-graphs" in python_flags(invoked.file)
    (kubectl,), _ = split_line(lines[1][1])
    assert invocation(tuple(kubectl)) is None
    (torchrun,), _ = split_line(lines[2][1])
    invoked = invocation(tuple(torchrun))
    assert invoked is not None and invoked.target == "distrifusion.cli.generate"
    assert flags(invoked.arguments) == ["--device"]  # not torchrun's own, nor what follows --
    assert split_line("a && b | c; d") == ([["a"], ["b"], ["c"], ["d"]], [])
    assert split_line("a '#x' b # it's a comment") == ([["a", "#x", "b"]], ["it's", "a", "comment"])


# ---------------------------------------------------------------------------------------------------
# Python examples, tensors, metrics


@functools.cache
def ensemble_tensors() -> frozenset[str]:
    config = (ROOT / "model_repository" / "sdxl" / "config.pbtxt").read_text(encoding="utf-8")
    inputs_outputs = re.split(r"^ensemble_scheduling", config, flags=re.M)[0]
    return frozenset(re.findall(r'^\s*name:\s*"([^"]+)"', inputs_outputs, flags=re.M)) - {"sdxl"}


def python_blocks() -> list[tuple[Path, Block]]:
    return [
        (document, block)
        for document in DOCUMENTS
        for block in read_markdown(document).blocks
        if block.language in ("python", "py")
    ]


def defined_names(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(target.id for target in targets if isinstance(target, ast.Name))
        elif isinstance(node, ast.ImportFrom | ast.Import):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
    return names


@pytest.mark.parametrize(
    ("document", "block"),
    python_blocks(),
    ids=[f"{relative(document)}:{block.line}" for document, block in python_blocks()],
)
def test_a_python_example_imports_what_exists_and_names_the_ensembles_tensors(
    document: Path, block: Block
) -> None:
    where = f"{relative(document)}:{block.line}"
    tree = ast.parse("\n".join(block.lines))
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.split(".")[0] in repository_packages()
        ):
            file = module_file(node.module) or module_file(f"{node.module}.__init__")
            assert file is not None, f"{where}: no module {node.module}"
            missing = [alias.name for alias in node.names if alias.name not in defined_names(file)]
            assert not missing, f"{where}: {node.module} defines no {missing}"
    source = "\n".join(block.lines)
    named = set(re.findall(r'Infer(?:Input|RequestedOutput)\(\s*"([^"]+)"', source))
    named |= set(re.findall(r'as_numpy\(\s*"([^"]+)"', source))
    assert named <= ensemble_tensors(), (
        f"{where}: {sorted(named - ensemble_tensors())} are no tensors of sdxl"
    )
    for model in re.findall(r'\.infer\(\s*"([^"]+)"', source):
        assert (ROOT / "model_repository" / model / "config.pbtxt").is_file(), f"{where}: no model {model}"


def test_the_contract_table_lists_exactly_the_ensembles_tensors() -> None:
    rows = []
    table = False
    for _, text in read_markdown(ROOT / "docs" / "serving.md").prose:
        if text.startswith("| tensor |"):
            table = True
        elif table and text.startswith("|"):
            first_cell = text.split("|")[1]
            if "---" not in first_cell:
                rows.extend(re.findall(r"`([^`]+)`", first_cell))
        elif table:
            break
    assert set(rows) == ensemble_tensors(), (
        f"docs/serving.md: {sorted(set(rows) - ensemble_tensors())} documented but not in the config, "
        f"{sorted(ensemble_tensors() - set(rows))} in the config but not documented"
    )


@functools.cache
def exported_source() -> str:
    return "\n".join(
        path.read_text(encoding="utf-8")
        for folder in ("backend", "model_repository")
        for path in sorted((ROOT / folder).rglob("*.py"))
    )


@pytest.mark.parametrize("document", DOCUMENTS, ids=relative)
def test_every_documented_metric_is_one_the_code_exports(document: Path) -> None:
    text = document.read_text(encoding="utf-8")
    documented = set(re.findall(r"\bdistrifusion_[a-z0-9_]*[a-z0-9]", text))
    missing = []
    for metric in sorted(documented):
        base = re.sub(r"_(bucket|sum|count)$", "", metric)
        if f'"{metric}"' not in exported_source() and f'"{base}"' not in exported_source():
            missing.append(metric)
    assert not missing, f"{relative(document)}: no metric {missing} in backend/ or model_repository/"


# ---------------------------------------------------------------------------------------------------
# Shape of the pages


@pytest.mark.parametrize("page", DOC_PAGES, ids=relative)
def test_a_docs_page_opens_with_what_its_reader_will_be_able_to_do(page: Path) -> None:
    paragraphs = [text for _, text in read_markdown(page).prose if text.strip()]
    assert paragraphs[0].startswith("# "), f"{relative(page)}: no title"
    assert paragraphs[1].startswith(LEAD), f"{relative(page)}: the first sentence should be {LEAD!r} ..."


def test_the_readme_fits_in_five_minutes() -> None:
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/"
