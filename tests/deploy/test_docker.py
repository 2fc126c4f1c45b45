"""Static checks of docker/: the Dockerfiles (parsed and linted with hadolint), compose.yaml and
the .dockerignore. No Docker engine is needed."""

from __future__ import annotations

import fnmatch
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import (
    DOCKER_DIR,
    DOCKERFILES,
    REPO_ROOT,
    TORCH_CPU_INDEX,
    flavour_of,
    train_torch_pin,
)

SERVE_PORT = 8000


@dataclass
class Stage:
    """One build stage: its base image, name and instructions ``(KEYWORD, arguments)``."""

    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


@dataclass
class Dockerfile:
    """A parsed Dockerfile: global ARG defaults and the stages in order."""

    args: dict[str, str]
    stages: list[Stage]

    def expand(self, text: str) -> str:
        return re.sub(r"\$\{?(\w+)\}?", lambda m: self.args.get(m.group(1), m.group(0)), text)


def parse_dockerfile(path: Path) -> Dockerfile:
    """Parse instructions (comments dropped, continuation lines joined)."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, f"{path}: dangling line continuation"
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            parts = rest.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(parts[0], name))
        elif not stages:
            assert keyword == "ARG", f"{path}: only ARG may precede FROM, got {line!r}"
            key, _, default = rest.partition("=")
            args[key] = default.strip('"')
        else:
            stages[-1].instructions.append((keyword, rest))
    return Dockerfile(args, stages)


@pytest.fixture(params=DOCKERFILES, ids=lambda p: p.name)
def dockerfile(request: pytest.FixtureRequest) -> tuple[Path, Dockerfile]:
    path: Path = request.param
    return path, parse_dockerfile(path)


def test_multi_stage_with_pinned_bases(dockerfile: tuple[Path, Dockerfile]) -> None:
    path, df = dockerfile
    assert len(df.stages) >= 2, f"{path.name} must be multi-stage"
    for stage in df.stages:
        image = df.expand(stage.base)
        assert "$" not in image, f"{path.name}: base {stage.base} has no default"
        repo, _, tag = image.rpartition(":")
        assert repo and tag, f"{path.name}: base image {image} has no tag"
        assert tag != "latest" and "latest" not in image, f"{path.name}: {image}"
    # the runtime stage copies the environment built in the build stage
    final = df.stages[-1]
    assert any(a.startswith("--from=builder /opt/venv") for a in final.all("COPY"))


def test_final_stage_user_is_not_root(dockerfile: tuple[Path, Dockerfile]) -> None:
    path, df = dockerfile
    users = df.stages[-1].all("USER")
    assert users, f"{path.name}: the final stage sets no USER (it would run as root)"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"{path.name}: USER {users[-1]}"
    assert user.isdigit(), "a numeric uid lets Kubernetes check runAsNonRoot"


def test_expose_healthcheck_and_command_agree_on_the_port(
    dockerfile: tuple[Path, Dockerfile],
) -> None:
    path, df = dockerfile
    final = df.stages[-1]
    assert final.all("EXPOSE") == [str(SERVE_PORT)]
    health = final.all("HEALTHCHECK")
    assert len(health) == 1, f"{path.name}: one HEALTHCHECK expected"
    assert f"127.0.0.1:{SERVE_PORT}/health/live" in health[0]
    assert "curl" not in health[0] and "wget" not in health[0]
    assert "urllib.request" in health[0]
    (entrypoint,) = final.all("ENTRYPOINT")
    (cmd,) = final.all("CMD")
    argv = yaml.safe_load(entrypoint) + yaml.safe_load(cmd)
    assert argv[:2] == ["jrs", "serve"]
    assert argv[argv.index("--port") + 1] == str(SERVE_PORT)
    assert argv[argv.index("--host") + 1] == "0.0.0.0"


def test_healthcheck_command_is_valid_python(dockerfile: tuple[Path, Dockerfile]) -> None:
    _, df = dockerfile
    (health,) = df.stages[-1].all("HEALTHCHECK")
    exec_form = yaml.safe_load(health[health.index("CMD") + 3 :])
    assert exec_form[0] == "/opt/venv/bin/python" and exec_form[1] == "-c"
    compile(exec_form[2], "HEALTHCHECK", "exec")


def test_model_bundled_and_settings_point_at_it(dockerfile: tuple[Path, Dockerfile]) -> None:
    path, df = dockerfile
    final = df.stages[-1]
    assert "models/crossstitch /opt/jrs/models/crossstitch" in final.all("COPY")
    env = " ".join(final.all("ENV"))
    assert "JRS_MODEL_DIR=/opt/jrs/models" in env
    assert "JRS_DATA_DIR=/var/lib/jrs" in env
    assert "PATH=/opt/venv/bin:" in env
    # the service is installed by the shared script, with the serve extra only
    runs = " ".join(df.stages[0].all("RUN"))
    assert "docker/install.sh /opt/venv" in runs, path.name
    assert f"/opt/venv {flavour_of(path)} /src" in runs


def test_gpu_image_has_cuda_runtime_and_onnxruntime_gpu() -> None:
    df = parse_dockerfile(DOCKER_DIR / "Dockerfile.gpu")
    base = df.expand(df.stages[-1].base)
    assert base.startswith("nvidia/cuda:") and "cudnn-runtime" in base
    assert "onnxruntime-gpu==" in " ".join(df.stages[0].all("ARG"))
    assert "JRS_DEVICE=cuda" in " ".join(df.stages[-1].all("ENV"))


def test_cpu_image_runs_the_network_with_openvino() -> None:
    df = parse_dockerfile(DOCKER_DIR / "Dockerfile.cpu")
    env = " ".join(df.stages[-1].all("ENV"))
    assert "JRS_DEVICE=cpu" in env and "JRS_ENGINE=openvino" in env
    # installed by the serve extra, which install.sh puts into the image and checks
    assert "import openvino" in (DOCKER_DIR / "install.sh").read_text()


def test_adapt_image_installs_cpu_torch_of_the_train_extra() -> None:
    """Dockerfile.adapt-cpu: exactly the train extra's torch, the CPU build from PyTorch's CPU
    index, then the train extra itself, all through install.sh (which checks the result)."""
    df = parse_dockerfile(DOCKER_DIR / "Dockerfile.adapt-cpu")
    builder = df.stages[0]
    args = dict(a.split("=", 1) for a in builder.all("ARG"))
    assert f"torch=={args['TORCH_VERSION']}" == train_torch_pin() == "torch==2.13.0"
    assert args["TORCH_INDEX"] == TORCH_CPU_INDEX
    (run,) = builder.all("RUN")
    words = shlex.split(run)
    assert "JRS_TORCH=torch==${TORCH_VERSION}" in words
    assert "JRS_TORCH_INDEX=${TORCH_INDEX}" in words
    assert words[-4:] == ["docker/install.sh", "/opt/venv", "adapt-cpu", "/src"]
    # the same base as the CPU image: one Python, one OpenVINO
    cpu = parse_dockerfile(DOCKER_DIR / "Dockerfile.cpu")
    assert {df.expand(s.base) for s in df.stages} == {cpu.expand(s.base) for s in cpu.stages}

    script = (DOCKER_DIR / "install.sh").read_text()
    # torch from the CPU index alone, then the serve and train extras (torch kept: 2.13.0+cpu
    # satisfies ==2.13.0), and the check that the build is the CPU one of the pin
    assert f"torch_index=${{JRS_TORCH_INDEX:-{TORCH_CPU_INDEX}}}" in script
    torch_line = '"${pip[@]}" install --index-url "$torch_index" "$torch_req"'
    extras_line = '"${pip[@]}" install "${src}[serve,train]"'
    assert script.index(torch_line) < script.index(extras_line)
    assert "--extra-index-url" not in script, "one index per install: no dependency confusion"
    assert "torch.version.cuda is not None" in script
    assert 'req.marker.evaluate({"extra": "train"})' in script


def test_adapt_image_runs_like_the_cpu_image_plus_adaptation() -> None:
    """The adaptation image is the CPU service image (same user, port, entry point, health
    check, model) plus torch, the weights of the bundled model and the JRS_ADAPT* defaults."""
    cpu = parse_dockerfile(DOCKER_DIR / "Dockerfile.cpu").stages[-1]
    adapt = parse_dockerfile(DOCKER_DIR / "Dockerfile.adapt-cpu").stages[-1]
    for keyword in ("USER", "EXPOSE", "HEALTHCHECK", "ENTRYPOINT", "CMD", "WORKDIR", "SHELL"):
        assert adapt.all(keyword) == cpu.all(keyword), keyword
    assert adapt.all("RUN") == cpu.all("RUN"), "the same jrs user and data folder"
    assert set(cpu.all("COPY")) < set(adapt.all("COPY"))
    (extra,) = set(adapt.all("COPY")) - set(cpu.all("COPY"))
    source, dest = shlex.split(extra)
    assert (REPO_ROOT / source).is_file() and source.endswith(".pt")
    # jrs adapt looks for the weights of <repo>/<name>/<version> in <repo>/checkpoints/
    assert dest == "/opt/jrs/models/checkpoints/"

    def env(stage: Stage) -> dict[str, str]:
        return dict(w.split("=", 1) for e in stage.all("ENV") for w in shlex.split(e))

    cpu_env, adapt_env = env(cpu), env(adapt)
    assert {k: v for k, v in adapt_env.items() if k in cpu_env} == cpu_env
    assert adapt_env["JRS_ADAPTATION"] == "auto"
    assert float(adapt_env["JRS_ADAPT_MINUTES"]) == 15
    # torch and friends write their caches under /tmp (read-only root filesystem)
    assert adapt_env["XDG_CACHE_HOME"].startswith("/tmp/")
    assert adapt_env["TORCHINDUCTOR_CACHE_DIR"].startswith("/tmp/")


def test_copied_paths_exist(dockerfile: tuple[Path, Dockerfile]) -> None:
    path, df = dockerfile
    for stage in df.stages:
        for args in stage.all("COPY"):
            if args.startswith("--from="):
                continue
            *sources, _dest = shlex.split(args)
            for src in sources:
                assert (REPO_ROOT / src).exists(), f"{path.name}: COPY {src} does not exist"


def _ignore_file(dockerfile: Path) -> Path:
    """BuildKit's ignore file of a Dockerfile: ``<Dockerfile>.dockerignore`` beside it, else the
    root ``.dockerignore``."""
    own = dockerfile.with_name(dockerfile.name + ".dockerignore")
    return own if own.is_file() else REPO_ROOT / ".dockerignore"


def _dockerignore(dockerfile: Path | None = None) -> list[str]:
    path = _ignore_file(dockerfile) if dockerfile else REPO_ROOT / ".dockerignore"
    lines = path.read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def _in_context(relpath: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins (a pattern matches a path or its parents)."""
    included = True
    parts = relpath.split("/")
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").rstrip("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatchcase(p, pat) for p in prefixes) or (
            pat.startswith("**/") and any(fnmatch.fnmatchcase(x, pat[3:]) for x in parts)
        ):
            included = negate
    return included


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerignore_keeps_what_the_images_copy_and_nothing_heavy(path: Path) -> None:
    patterns = _dockerignore(path)
    ignore = _ignore_file(path).name
    assert patterns[0] == "*", "the context starts from nothing and adds what is copied"
    copied: list[str] = []
    for stage in parse_dockerfile(path).stages:
        for args in stage.all("COPY"):
            if args.startswith("--from="):
                continue
            *sources, _ = shlex.split(args)
            copied += sources
    for src in copied:
        assert _in_context(src, patterns), f"{ignore} drops {src}"
    for heavy in (".venv/bin/python", ".git/HEAD", "models/checkpoints/x.pt", "runs/a", "tests"):
        assert not _in_context(heavy, patterns), f"{ignore} lets {heavy} in"
    assert not _in_context("jrs/__pycache__/x.pyc", patterns)
    assert not _in_context("docker/secrets/api-keys.txt", patterns)
    assert not _in_context("models/checkpoints/crossstitch_v3_last.pt", patterns)
    # nothing in the context that the image does not copy
    for name in (
        "pyproject.toml",
        "models/crossstitch",
        "models/checkpoints/crossstitch_cpu_last.pt",
    ):
        assert _in_context(name, patterns) == any(
            name == src or name.startswith(src.rstrip("/") + "/") for src in copied
        ), f"{ignore}: {name}"


def test_only_the_adaptation_image_has_its_own_ignore_file() -> None:
    """BuildKit uses <Dockerfile>.dockerignore in place of the root one; the CPU and GPU images
    keep the root .dockerignore (no torch weights in them)."""
    owned = sorted(p.name for p in DOCKER_DIR.glob("*.dockerignore"))
    assert owned == ["Dockerfile.adapt-cpu.dockerignore"]
    assert _dockerignore(DOCKER_DIR / "Dockerfile.cpu") == _dockerignore()
    # the adaptation image's context is the root one plus the checkpoint of the bundled model
    extra = set(_dockerignore(DOCKER_DIR / "Dockerfile.adapt-cpu")) - set(_dockerignore())
    assert extra == {"!models/checkpoints/crossstitch_cpu_last.pt"}
    assert set(_dockerignore()) <= set(_dockerignore(DOCKER_DIR / "Dockerfile.adapt-cpu"))


def test_hadolint_passes(hadolint: str) -> None:
    proc = subprocess.run(
        [hadolint, "--no-color", *map(str, DOCKERFILES)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_catches_a_latest_tag(hadolint: str, tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN echo hi\n")
    proc = subprocess.run(
        [hadolint, "--no-color", str(bad)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode != 0 and "DL3007" in proc.stdout


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((DOCKER_DIR / "compose.yaml").read_text())
    return data


def test_compose_cpu_service_and_gpu_profile(compose: dict[str, Any]) -> None:
    services = compose["services"]
    cpu, gpu = services["jrs"], services["jrs-gpu"]
    assert "profiles" not in cpu, "the CPU service starts with a plain `docker compose up`"
    assert gpu["profiles"] == ["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "deploy" not in cpu
    for svc, dockerfile in ((cpu, "Dockerfile.cpu"), (gpu, "Dockerfile.gpu")):
        assert svc["build"]["dockerfile"] == f"docker/{dockerfile}"
        assert (DOCKER_DIR / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()
        assert "latest" not in svc["image"]
        assert svc["read_only"] is True and svc["cap_drop"] == ["ALL"]
        env = svc["environment"]
        assert env["JRS_API_KEYS_FILE"] == "/run/secrets/jrs_api_keys"
        assert "JRS_API_KEYS" in env, "keys may come from the environment too"
        assert env["JRS_DATA_DIR"] == "/var/lib/jrs"
        assert [s["source"] for s in svc["secrets"]] == ["jrs_api_keys"]
        assert any(p.endswith(f":{SERVE_PORT}") for p in svc["ports"])
    assert cpu["environment"]["JRS_DEVICE"] == "cpu"
    assert gpu["environment"]["JRS_DEVICE"] == "cuda"


def test_compose_data_volumes_are_never_shared(compose: dict[str, Any]) -> None:
    volumes = {
        name: [v.split(":")[0] for v in svc["volumes"] if v.endswith(":/var/lib/jrs")]
        for name, svc in compose["services"].items()
    }
    assert all(len(v) == 1 for v in volumes.values()), volumes
    named = [v[0] for v in volumes.values()]
    assert len(set(named)) == len(named), "two services on one job store"
    assert set(named) <= set(compose["volumes"])
    assert "file" in compose["secrets"]["jrs_api_keys"]


def test_compose_and_docker_yaml_lint() -> None:
    yamllint = pytest.importorskip("yamllint.cli")
    config = "{extends: default, rules: {line-length: {max: 100}, document-start: disable}}"
    with pytest.raises(SystemExit) as stop:
        yamllint.run(["--strict", "-d", config, str(DOCKER_DIR / "compose.yaml")])
    assert stop.value.code == 0
