"""The deploy/ files parse, set only real settings, ship no default password, and keep the
fleet's rules: one GPU per worker, a protected Redis, non-root processes, a private bucket."""

from __future__ import annotations

import configparser
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from skufleet.schemas.names import render_queue
from skufleet.schemas.settings import DEFAULT_MODEL, Settings

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
SYSTEMD = DEPLOY / "systemd"
SETTINGS = {f"SKUFLEET_{name.upper()}" for name in Settings.model_fields}
LEASE_SECONDS = Settings.model_fields["lease_seconds"].default

SKUFLEET_NAME = re.compile(r"\bSKUFLEET_[A-Z0-9_]+")
REQUIRED = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*:\?[^}]+\}")
"""Compose's ``${VAR:?message}``: no value, no start."""
SECRET_NAME = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|BASIC_AUTH|TOKEN|REDIS_URL|DATABASE_URL")
"""Names of variables that carry a credential (the URLs carry passwords)."""

# Passwords that ship as defaults somewhere, and so are the first ones tried. The placeholder
# CHANGE-ME is not among them, and neither is PASSWORD in capitals inside a URL, the notation
# README.md and env.example use for "your password here" (redis://:PASSWORD@host).
WEAK = {
    "password",
    "passw0rd",
    "admin",
    "administrator",
    "guest",
    "changeme",
    "change_me",
    "postgres",
    "redis",
    "secret",
    "123456",
    "12345678",
    "root",
    "toor",
    "letmein",
    "minioadmin",
    "minio123",
    "default",
    "test",
    "qwerty",
}
_WEAK = "|".join(sorted(map(re.escape, WEAK), key=len, reverse=True))
_SECRET_ASSIGNMENT = re.compile(
    r"(?i)([\w.-]*(?:pass|secret|token|auth|credential|access_key|api_key)[\w.-]*)"
    r"[\"']?[ \t]*[:=][ \t]*[\"']?([^\s\"',;}]*)"
)
_URL_CREDENTIALS = re.compile(r"://([^\s:/@]*):([^\s@/]+)@")
_REQUIREPASS = re.compile(r"(?i)requirepass[\"']?[\s\"',-]+([^\s\"',\]]+)")
_WEAK_DEFAULT = re.compile(rf"(?i)\$\{{\w+:?-[\"']?({_WEAK})[\"']?\}}")
_WEAK_PAIR = re.compile(
    rf"(?i)(?<![\w.-])(?:admin|guest|root|user|test|minio|flower|postgres|redis):({_WEAK})"
    r"(?![\w.-])"
)
_ALWAYS_BAD = re.compile(r"(?i)minioadmin|(?<![\w-])change_?me(?![\w-])")


def default_credentials(text: str) -> list[str]:
    """Every place in ``text`` where a well-known default password is set or offered."""
    found = [m.group(0) for m in _ALWAYS_BAD.finditer(text)]
    for match in _SECRET_ASSIGNMENT.finditer(text):
        value = match.group(2)
        if value.lower() in WEAK or value.rsplit(":", 1)[-1].lower() in WEAK:
            found.append(match.group(0))
    for match in _URL_CREDENTIALS.finditer(text):
        user, password = match.groups()
        if password == "PASSWORD":
            continue
        if password.lower() in WEAK or (user and password == user):
            found.append(match.group(0))
    found += [m.group(0) for m in _REQUIREPASS.finditer(text) if m.group(1).lower() in WEAK]
    found += [m.group(0) for m in _WEAK_DEFAULT.finditer(text)]
    found += [m.group(0) for m in _WEAK_PAIR.finditer(text)]
    return found


def deploy_files() -> list[Path]:
    return sorted(
        path
        for path in DEPLOY.rglob("*")
        if path.is_file() and not any(part.startswith(".") for part in path.parts)
    )


def yaml_files() -> list[Path]:
    return [path for path in deploy_files() if path.suffix in (".yaml", ".yml")]


def compose() -> dict[str, Any]:
    document = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert isinstance(document, dict)
    return document


def kubernetes_objects() -> list[dict[str, Any]]:
    return [
        document
        for path in sorted(KUBERNETES.glob("*.yaml"))
        for document in yaml.safe_load_all(path.read_text())
        if document is not None
    ]


def kubernetes_object(kind: str, name: str) -> dict[str, Any]:
    matches = [
        obj
        for obj in kubernetes_objects()
        if obj["kind"] == kind and obj["metadata"]["name"] == name
    ]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def pod_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    """``(kind/name, pod spec)`` of every workload in deploy/kubernetes."""
    for obj in kubernetes_objects():
        if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield f"{obj['kind']}/{obj['metadata']['name']}", obj["spec"]["template"]["spec"]


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def environment(service: dict[str, Any]) -> dict[str, str]:
    """A compose service's environment, as a mapping whichever way it is written."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {name: "" if value is None else str(value) for name, value in env.items()}


def command_line(entry: dict[str, Any]) -> str:
    """A compose service's or a container's command, as one string."""
    parts = []
    for key in ("entrypoint", "command", "args"):
        value = entry.get(key)
        if value is not None:
            parts.append(value if isinstance(value, str) else " ".join(map(str, value)))
    return " ".join(parts)


def program(command: str) -> str:
    """``command`` with its program named without a path: ``skufleet reconcile --watch``."""
    program, _, rest = command.strip().partition(" ")
    return f"{program.rsplit('/', 1)[-1]} {rest}".strip()


class _Repeated(dict[str, Any]):
    """Keeps every value of a repeated key: systemd allows Environment= many times."""

    def __setitem__(self, key: str, value: Any) -> None:
        if isinstance(value, list) and key in self and isinstance(self[key], list):
            self[key].extend(value)
        else:
            super().__setitem__(key, value)


def read_unit(path: Path) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(
        strict=False, interpolation=None, dict_type=_Repeated, delimiters=("=",)
    )
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(path.read_text())
    return parser


def unit_values(unit: configparser.RawConfigParser, key: str) -> list[str]:
    """Every value of ``key`` in [Service], one per line it was set on."""
    raw = unit.get("Service", key, fallback="")
    return [line.strip() for line in raw.splitlines() if line.strip()]


def unit_environment(unit: configparser.RawConfigParser) -> dict[str, str]:
    return dict(
        assignment.split("=", 1)
        for line in unit_values(unit, "Environment")
        for assignment in line.split()
    )


def seconds(duration: str | int) -> int:
    """``960``, ``"16m"``, ``"1h30m"`` or ``"90s"`` in seconds."""
    if isinstance(duration, int) or str(duration).isdigit():
        return int(duration)
    units = {"h": 3600, "m": 60, "s": 1}
    parts = re.findall(r"(\d+)\s*([hms])", str(duration))
    assert parts, f"not a duration: {duration!r}"
    return sum(int(count) * units[unit] for count, unit in parts)


def set_variables() -> set[str]:
    """Every environment variable some deploy file sets."""
    names: set[str] = set()
    document = compose()
    for service in document["services"].values():
        names |= set(environment(service))
    for key, block in document.items():
        if key.startswith("x-") and isinstance(block, dict):
            names |= {name for name in block if re.fullmatch(r"[A-Z][A-Z0-9_]*", name)}
    for obj in kubernetes_objects():
        if obj["kind"] in ("ConfigMap", "Secret"):
            names |= set(obj.get("data") or {}) | set(obj.get("stringData") or {})
    for _, spec in pod_specs():
        for container in containers(spec):
            names |= {entry["name"] for entry in container.get("env", [])}
    for path in SYSTEMD.glob("*.service"):
        names |= set(unit_environment(read_unit(path)))
    dockerfile = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    for line in dockerfile.splitlines():
        if line.startswith("ENV "):
            names |= set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", line))
    for path in DEPLOY.glob("*env*"):
        if path.suffix not in (".yaml", ".yml", ".json", ".md"):
            for line in path.read_text().splitlines():
                if re.match(r"[A-Za-z_][A-Za-z0-9_]*=", line):
                    names.add(line.split("=", 1)[0])
    return names


def test_every_yaml_file_under_deploy_parses() -> None:
    """Compose and Kubernetes files are valid YAML, each document a mapping."""
    paths = yaml_files()
    assert DEPLOY / "compose.yaml" in paths and len(paths) >= 9
    for path in paths:
        documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
        assert documents, path
        assert all(isinstance(doc, dict) for doc in documents), path


def test_every_skufleet_variable_set_in_deploy_is_a_setting() -> None:
    """A SKUFLEET_ variable that Settings does not know would be silently ignored."""
    skufleet = {name for name in set_variables() if name.startswith("SKUFLEET_")}
    assert {"SKUFLEET_REDIS_URL", "SKUFLEET_FLOWER_BASIC_AUTH", "SKUFLEET_CACHE_DIR"} <= skufleet
    assert skufleet <= SETTINGS, sorted(skufleet - SETTINGS)


def test_every_skufleet_name_mentioned_in_deploy_is_a_setting() -> None:
    """Comments and docs name real settings too, so nobody copies a misspelt one."""
    unknown = {
        f"{path.relative_to(DEPLOY)}: {name}"
        for path in deploy_files()
        for name in SKUFLEET_NAME.findall(path.read_text())
        if name not in SETTINGS
    }
    assert not unknown, sorted(unknown)


@pytest.mark.parametrize(
    "planted",
    [
        "MINIO_ROOT_PASSWORD: minioadmin",
        "password: password",
        "POSTGRES_PASSWORD: postgres",
        'POSTGRES_PASSWORD: "postgres"',
        "SKUFLEET_REDIS_URL=redis://:redis@redis:6379/0",
        "SKUFLEET_REDIS_URL=redis://:password@redis:6379/0",
        "--requirepass redis",
        "SKUFLEET_DATABASE_URL=postgresql://skufleet:skufleet@postgres/skufleet",
        "broker: amqp://guest:guest@rabbitmq:5672//",
        'command: ["redis-server", "--requirepass", "secret"]',
        "SKUFLEET_FLOWER_BASIC_AUTH=admin:admin",
        "SKUFLEET_FLOWER_BASIC_AUTH=flower:123456",
        "AWS_SECRET_ACCESS_KEY=changeme",
        "REDIS_PASSWORD: ${REDIS_PASSWORD:-redis}",
        "default login admin:admin",
    ],
)
def test_the_default_password_check_catches_a_planted_default(planted: str) -> None:
    """The check itself finds each kind of well-known default it is meant to refuse."""
    assert default_credentials(planted)


@pytest.mark.parametrize(
    "placeholder",
    [
        "password: CHANGE-ME",
        "SKUFLEET_REDIS_URL=redis://:CHANGE-ME@redis:6379/0",
        "# the password goes in the URL: redis://:PASSWORD@host:6379/0",
        'POSTGRES_PASSWORD: "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD in .env}"',
        "SKUFLEET_FLOWER_BASIC_AUTH: CHANGE-ME:CHANGE-ME",
        "user: redis",
        "image: postgres:16",
        "- parameter: password",
    ],
)
def test_the_default_password_check_allows_placeholders(placeholder: str) -> None:
    """CHANGE-ME, required variables and ordinary words are not mistaken for defaults."""
    assert default_credentials(placeholder) == []


def test_no_deploy_file_contains_a_well_known_default_password() -> None:
    """Nothing under deploy/ would start a service with a password an attacker tries first."""
    found = {
        f"{path.relative_to(DEPLOY)}: {hit}"
        for path in deploy_files()
        for hit in default_credentials(path.read_text())
    }
    assert not found, sorted(found)


def test_every_compose_worker_reserves_exactly_one_gpu() -> None:
    """One GPU per worker container, each a different one, so `--devices all` starts one."""
    services = compose()["services"]
    workers = {
        name: service
        for name, service in services.items()
        if "skufleet-worker" in command_line(service)
    }
    assert {"worker-gpu0", "worker-gpu1"} <= set(workers)
    used = []
    for name, service in workers.items():
        assert "skufleet-worker --devices all" in command_line(service), name
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1, name
        (device,) = devices
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"], name
        assert "count" not in device and len(device["device_ids"]) == 1, name
        used.append(str(device["device_ids"][0]))
        assert service["restart"] == "unless-stopped", name
        assert any(str(v).endswith(":/models") for v in service["volumes"]), name
    assert len(set(used)) == len(used)


def test_compose_redis_requires_a_password_and_never_evicts() -> None:
    """Redis needs a password, keeps an append-only file and refuses writes when full."""
    redis = compose()["services"]["redis"]
    command = command_line(redis)
    assert re.search(r"--requirepass \$\{REDIS_PASSWORD:\?[^}]+\}", command)
    assert "--appendonly yes" in command
    assert "--maxmemory-policy noeviction" in command
    assert redis["volumes"]


def test_compose_flower_takes_its_basic_auth_from_the_environment() -> None:
    """Flower listens beyond loopback only with a login that compose insists on."""
    flower = compose()["services"]["flower"]
    assert "skufleet flower" in command_line(flower)
    assert REQUIRED.fullmatch(environment(flower)["SKUFLEET_FLOWER_BASIC_AUTH"])


def test_every_compose_secret_is_a_required_variable() -> None:
    """Secrets come from .env through ${VAR:?...}, never from a value written in the file."""
    document = compose()
    blocks = [environment(service) for service in document["services"].values()]
    blocks += [block for key, block in document.items() if key.startswith("x-") and "env" in key]
    checked = 0
    for block in blocks:
        for name, value in block.items():
            if SECRET_NAME.search(name) or name.endswith("ROOT_USER"):
                assert REQUIRED.search(str(value)), f"{name}: {value}"
                checked += 1
    assert checked >= 10


def test_compose_defaults_are_the_settings_defaults() -> None:
    """A ${SKUFLEET_X:-default} in compose says what Settings would use anyway."""
    env = compose()["x-skufleet-env"]
    defaults = {
        match.group(1): match.group(2)
        for value in env.values()
        if (match := re.fullmatch(r"\$\{(SKUFLEET_[A-Z0-9_]+):-([^}]*)\}", str(value)))
    }
    assert len(defaults) >= 5
    for name, written in defaults.items():
        default = Settings.model_fields[name.removeprefix("SKUFLEET_").lower()].default
        if default is None:
            assert written == "", name
        else:
            assert type(default)(written) == default, name
    assert env["SKUFLEET_MODEL"].endswith(f":-{DEFAULT_MODEL}}}")


def test_every_supervisor_waits_out_the_longest_batch() -> None:
    """A stopping worker finishes its batch (up to the lease) before it is killed."""
    services = compose()["services"]
    for name in ("worker-gpu0", "worker-gpu1"):
        assert seconds(services[name]["stop_grace_period"]) > LEASE_SECONDS, name
    worker = kubernetes_object("Deployment", "skufleet-worker")
    assert worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > LEASE_SECONDS
    unit = read_unit(SYSTEMD / "skufleet-worker@.service")
    assert seconds(unit.get("Service", "TimeoutStopSec")) > LEASE_SECONDS


def test_kubernetes_worker_gets_one_gpu_and_runs_as_non_root() -> None:
    """Each worker pod holds one GPU, runs `skufleet-worker --devices all`, as a plain user."""
    worker = kubernetes_object("Deployment", "skufleet-worker")
    spec = worker["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert "skufleet-worker --devices all" in command_line(container)
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert "replicas" not in worker["spec"]  # KEDA owns the count
    mounts = {mount["mountPath"] for mount in container["volumeMounts"]}
    assert "/models" in mounts


def test_every_kubernetes_pod_meets_the_restricted_pod_security_level() -> None:
    """The namespace enforces `restricted`, so every pod must be non-root and unprivileged."""
    namespace = kubernetes_object("Namespace", "skufleet")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    specs = dict(pod_specs())
    assert len(specs) >= 5
    for name, spec in specs.items():
        pod = spec.get("securityContext", {})
        assert pod.get("runAsNonRoot") is True, name
        assert pod.get("seccompProfile", {}).get("type") == "RuntimeDefault", name
        for container in containers(spec):
            context = container.get("securityContext", {})
            assert context.get("allowPrivilegeEscalation") is False, name
            assert context.get("capabilities", {}).get("drop") == ["ALL"], name


def test_kubernetes_references_point_at_objects_that_exist() -> None:
    """envFrom, secretKeyRef and claimName name a ConfigMap, Secret or claim defined here."""
    defined = {(obj["kind"], obj["metadata"]["name"]) for obj in kubernetes_objects()}
    for name, spec in pod_specs():
        for container in containers(spec):
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    assert ("ConfigMap", source["configMapRef"]["name"]) in defined, name
                if "secretRef" in source:
                    assert ("Secret", source["secretRef"]["name"]) in defined, name
            for entry in container.get("env", []):
                ref = entry.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    secret = kubernetes_object("Secret", ref["name"])
                    assert ref["key"] in secret["stringData"], name
        for volume in spec.get("volumes", []):
            claim = volume.get("persistentVolumeClaim")
            if claim:
                assert ("PersistentVolumeClaim", claim["claimName"]) in defined, name


def test_kubernetes_secret_templates_hold_only_placeholders() -> None:
    """The Secret templates carry CHANGE-ME where a credential goes, never a real value."""
    secrets = [obj for obj in kubernetes_objects() if obj["kind"] == "Secret"]
    assert secrets
    for secret in secrets:
        for key, value in (secret.get("stringData") or {}).items():
            if SECRET_NAME.search(key.upper()):
                assert value == "" or "CHANGE-ME" in value, f"{secret['metadata']['name']}.{key}"
        assert not secret.get("data"), "base64 data hides what a template holds"


def test_keda_scales_the_worker_deployment_on_its_render_queue() -> None:
    """KEDA reads the length of the list that carries the default model's render batches."""
    scaled = kubernetes_object("ScaledObject", "skufleet-worker")["spec"]
    assert scaled["scaleTargetRef"]["name"] == "skufleet-worker"
    assert scaled["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    kubernetes_object("Deployment", scaled["scaleTargetRef"]["name"])
    assert scaled["minReplicaCount"] == 0 and scaled["maxReplicaCount"] >= 1
    (trigger,) = scaled["triggers"]
    assert trigger["type"] == "redis"
    queue = render_queue("skufleet", "stable-diffusion-v1-5/stable-diffusion-v1-5")
    assert trigger["metadata"]["listName"] == queue
    config = kubernetes_object("ConfigMap", "skufleet-config")["data"]
    assert queue == render_queue(config["SKUFLEET_QUEUE_PREFIX"], config["SKUFLEET_MODEL"])
    assert int(trigger["metadata"]["listLength"]) >= 1
    auth = kubernetes_object("TriggerAuthentication", trigger["authenticationRef"]["name"])
    parameters = {ref["parameter"]: ref for ref in auth["spec"]["secretTargetRef"]}
    assert {"address", "password"} <= set(parameters)
    for ref in parameters.values():
        assert ref["key"] in kubernetes_object("Secret", ref["name"])["stringData"]


def test_systemd_worker_unit_pins_one_gpu_and_restarts_on_failure() -> None:
    """Instance %i sees only GPU %i, and a worker whose GPU failed is started again."""
    unit = read_unit(SYSTEMD / "skufleet-worker@.service")
    assert unit_environment(unit)["CUDA_VISIBLE_DEVICES"] == "%i"
    assert unit.get("Service", "Restart") == "on-failure"
    assert unit.get("Service", "ExecStart").endswith("skufleet-worker --devices all")
    assert unit.get("Service", "KillSignal") == "SIGTERM"
    assert unit.get("Service", "EnvironmentFile") == "/etc/skufleet/env"
    assert "PrivateDevices" not in unit["Service"]  # it would hide /dev/nvidia*


def test_every_systemd_unit_runs_sandboxed_as_the_skufleet_user() -> None:
    """No unit runs as root; each gets a read-only system and a private /tmp."""
    paths = sorted(SYSTEMD.glob("*.service"))
    assert {path.name for path in paths} == {
        "skufleet-worker@.service",
        "skufleet-reconciler.service",
        "skufleet-flower.service",
    }
    for path in paths:
        text = path.read_text()
        assert not re.search(r"\\\n", text), f"{path.name}: continuation lines"
        service = read_unit(path)["Service"]
        assert service["User"] == "skufleet", path.name
        assert service["NoNewPrivileges"] == "yes", path.name
        assert service["ProtectSystem"] == "strict", path.name
        assert service["PrivateTmp"] == "yes", path.name
        assert service["Restart"] == "on-failure", path.name


def topology_commands() -> dict[str, list[str]]:
    """Every command each topology starts (one-shot jobs included), once per process."""
    commands: dict[str, list[str]] = {"compose": [], "kubernetes": [], "systemd": []}
    for service in compose()["services"].values():
        commands["compose"].append(program(command_line(service)))
    for obj in kubernetes_objects():
        if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            # a Deployment without replicas (KEDA's workers) runs any number of pods: count 2
            count = obj["spec"].get("replicas", 2)
            for container in containers(obj["spec"]["template"]["spec"]):
                commands["kubernetes"] += [program(command_line(container))] * count
    for path in SYSTEMD.glob("*.service"):
        unit = read_unit(path)
        # a template unit (name@.service) runs once per instance enabled: count 2
        count = 2 if path.name.endswith("@.service") else 1
        for key in ("ExecStartPre", "ExecStart"):
            commands["systemd"] += [program(line) for line in unit_values(unit, key)] * count
    return commands


def test_every_topology_runs_exactly_one_reconciler_and_no_beat() -> None:
    """One `skufleet reconcile --watch` per fleet in compose, kubernetes and systemd alike;
    Celery beat and its reconcile task are gone, and no deploy file mentions beat."""
    for topology, commands in topology_commands().items():
        assert commands.count("skufleet reconcile --watch") == 1, (topology, commands)
        assert not [c for c in commands if re.match(r"skufleet beat\b", c)], topology
    mentions = {
        f"{path.relative_to(DEPLOY)}: {line.strip()}"
        for path in deploy_files()
        for line in path.read_text().splitlines()
        if re.search(r"(?i)\bbeat\b", line)
    }
    assert not mentions, sorted(mentions)


def test_the_reconciler_needs_no_gpu_and_no_state_and_migrates_first_on_systemd() -> None:
    """The reconciler reaches Redis, the ledger and the bucket; no GPU, no state directory."""
    service = compose()["services"]["reconciler"]
    assert program(command_line(service)) == "skufleet reconcile --watch"
    assert "deploy" not in service and not service.get("volumes")
    assert environment(service) == compose()["x-skufleet-env"]
    reconciler = kubernetes_object("Deployment", "skufleet-reconciler")
    assert reconciler["spec"]["replicas"] == 1
    spec = reconciler["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert program(command_line(container)) == "skufleet reconcile --watch"
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {})
    assert {volume["name"] for volume in spec.get("volumes", [])} <= {"tmp"}
    assert {"configMapRef", "secretRef"} <= {key for ref in container["envFrom"] for key in ref}
    unit = read_unit(SYSTEMD / "skufleet-reconciler.service")
    assert [program(line) for line in unit_values(unit, "ExecStartPre")] == ["skufleet db upgrade"]
    assert unit.get("Service", "EnvironmentFile") == "/etc/skufleet/env"
    assert "SKUFLEET_CACHE_DIR" not in unit_environment(unit)
    assert not {"StateDirectory", "CacheDirectory", "ReadWritePaths"} & set(unit["Service"])
    assert unit.get("Service", "PrivateDevices") == "yes"  # no GPU to reach


def test_the_image_runs_as_an_unprivileged_user_with_a_model_volume() -> None:
    """The Dockerfile's last USER is not root, /models is a volume, the worker is the CMD."""
    lines = (DEPLOY / "Dockerfile").read_text().splitlines()
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert any(line.startswith("VOLUME") and "/models" in line for line in lines)
    (cmd,) = [line for line in lines if line.startswith("CMD ")]
    assert json.loads(cmd.removeprefix("CMD ")) == ["skufleet-worker", "--devices", "all"]


def test_the_bucket_policy_grants_one_principal_read_only() -> None:
    """The example policy never names "*" as principal and allows only reads."""
    policy = json.loads((DEPLOY / "bucket-policy.json").read_text())
    assert policy["Statement"]
    for statement in policy["Statement"]:
        principal = statement["Principal"]
        values = principal.values() if isinstance(principal, dict) else [principal]
        flat = [v for value in values for v in (value if isinstance(value, list) else [value])]
        assert flat and "*" not in flat, statement
        assert statement["Effect"] == "Allow"
        actions = statement["Action"]
        actions = [actions] if isinstance(actions, str) else actions
        assert set(actions) <= {"s3:GetObject", "s3:ListBucket"}, statement
    assert '"*"' not in json.dumps(policy)


# --- the Grafana dashboard -----------------------------------------------------------------

GRAFANA = DEPLOY / "grafana"
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "gauge": ("",),
}
"""The series Prometheus stores for a metric family of each type."""
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and"}
PROMQL_WORDS |= {"or", "unless", "offset", "inf", "nan", "Inf", "NaN"}


def exported_series() -> dict[str, str]:
    """Every series name skufleet exports, and its metric type: the exporter's families
    (``producer.metrics``) and the workers' (``worker.metrics``, from the default registry
    they register on), read from the code."""
    from prometheus_client import REGISTRY

    import skufleet.worker.metrics  # noqa: F401  (registers the worker's metrics)
    from skufleet.producer.metrics import families

    found = {}
    for family in [*families().values(), *REGISTRY.collect()]:
        if family.name.startswith("skufleet_"):
            found |= {family.name + suffix: family.type for suffix in SUFFIXES[family.type]}
    return found


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers outside strings, label
    matchers, ranges and grouping clauses that are neither functions nor keywords."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.])[A-Za-z_:][\w:]*", text):
        if text[match.end() :].lstrip().startswith("(") or match.group(0) in PROMQL_WORDS:
            continue  # a function, or an aggregation's keyword
        names.add(match.group(0))
    return names


def dashboard() -> dict[str, Any]:
    document = json.loads((GRAFANA / "skufleet.json").read_text())
    assert isinstance(document, dict)
    return document


def dashboard_queries() -> dict[str, list[str]]:
    """Every panel's title → its PromQL expressions, and the template variables' queries."""
    queries = {
        panel["title"]: [target["expr"] for target in panel.get("targets", [])]
        for panel in dashboard()["panels"]
        if panel["type"] != "row"
    }
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            queries[f"${variable['name']}"] = [variable["definition"]]
    return queries


def test_the_promql_name_check_finds_metrics_and_skips_functions_labels_and_keywords() -> None:
    """The check itself: names outside functions, matchers, ranges and `by (…)` are found."""
    expr = (
        'sum by (run) (skufleet_items{status=~"queued|x_total"}) / (sum by (le, device) '
        "(rate(skufleet_worker_render_seconds_bucket[5m])) > 0) * 1e-9 + on(run) group_left "
        "nope_metric"
    )
    assert metric_names(expr) == {
        "skufleet_items",
        "skufleet_worker_render_seconds_bucket",
        "nope_metric",
    }
    # a template variable's label_values() names a label too: the caller drops it
    assert metric_names("label_values(skufleet_items, run)") == {"skufleet_items", "run"}


def test_every_dashboard_query_reads_only_metrics_the_code_exports() -> None:
    """Each panel has queries, and every metric they name is one that producer/metrics.py
    or worker/metrics.py exports (a renamed metric fails here, not on a blank panel)."""
    exported = exported_series()
    assert "skufleet_worker_images_total" in exported and "skufleet_items" in exported
    for title, exprs in dashboard_queries().items():
        assert exprs, title
        for expr in exprs:
            names = metric_names(expr) - ({"run"} if title.startswith("$") else set())
            assert names, (title, expr)
            assert names <= set(exported), (title, sorted(names - set(exported)))


def test_dashboard_rates_come_from_worker_counters_and_cover_the_fleet() -> None:
    """rate() reads only counters and histogram buckets (deriv() only gauges); the
    dashboard shows queue depth, images/s per GPU, failures and each run's ETA and
    remaining items."""
    exported = exported_series()
    exprs = [expr for found in dashboard_queries().values() for expr in found]
    for expr in exprs:
        for function, argument in re.findall(r"\b(rate|increase|deriv)\(([^\[]*)\[", expr):
            for name in metric_names(argument):
                kind = "gauge" if function == "deriv" else ("counter", "histogram")
                assert exported[name] in kind, (function, name)
                if function != "deriv":
                    assert name.endswith(("_total", "_bucket")), name
    titles = set(dashboard_queries())
    assert {"Queue depth", "Images per second per GPU", "ETA", "Remaining items"} <= titles
    assert any("rate(skufleet_worker_images_total" in expr for expr in exprs)
    assert any("skufleet_run_failures" in expr for expr in exprs)
    assert any('status="failed"' in expr for expr in exprs)


def test_the_dashboard_and_its_provisioning_example_fit_together() -> None:
    """Panels have unique ids and a place on the grid; every query goes to the datasource
    variable; the provisioning example loads files from a folder, and the Prometheus
    example scrapes the exporter's port."""
    panels = dashboard()["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    assert all({"x", "y", "w", "h"} <= set(panel["gridPos"]) for panel in panels)
    for panel in panels:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
    (provider,) = yaml.safe_load((GRAFANA / "provisioning/dashboards/skufleet.yaml").read_text())[
        "providers"
    ]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/")
    (source,) = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yaml").read_text())[
        "datasources"
    ]
    assert source["type"] == "prometheus"
    scrape = yaml.safe_load((GRAFANA / "prometheus.yml").read_text())["scrape_configs"]
    targets = [t for job in scrape for config in job["static_configs"] for t in config["targets"]]
    assert any(target.endswith(":9808") for target in targets)
