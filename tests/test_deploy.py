"""The deploy files say what they do: least privilege by default, isolated variants that
name real settings and grant what the sandbox needs (parsed; Docker is not run here)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from qrelay.executor.programs.settings import SandboxSettings

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
NEEDED_CAPS = {"SYS_ADMIN", "SYS_NICE"}  # beyond Docker's defaults (SETUID, SETGID, CHOWN, KILL)
SANDBOX_ENV = re.compile(r"^QRELAY_EXECUTOR_SANDBOX__([A-Z_]+)$")


def _compose(*names: str) -> dict[str, Any]:
    """compose files merged the way `docker compose -f a -f b` merges services (shallow)."""
    services: dict[str, dict[str, Any]] = {}
    for name in names:
        doc = yaml.safe_load((DEPLOY / name).read_text())
        for service, spec in doc["services"].items():
            services.setdefault(service, {}).update(spec)
    return services


def _k8s(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((DEPLOY / "k8s" / name).read_text()) if d]


def _executors(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        c
        for d in docs
        if d["kind"] == "Deployment"
        for c in d["spec"]["template"]["spec"]["containers"]
        if c["name"] == "executor"
    ]


def _sandbox_fields(env: dict[str, str]) -> dict[str, str]:
    out = {}
    for key, value in env.items():
        match = SANDBOX_ENV.match(key)
        if match:
            out[match.group(1).lower()] = value
    return out


def test_image_runs_unprivileged_and_ships_the_isolation_entrypoint() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^USER qrelay$", dockerfile, re.M)
    assert "qrelay-sandbox-entrypoint" in dockerfile
    assert "libseccomp2" in dockerfile


def test_default_compose_and_k8s_executors_stay_least_privilege() -> None:
    for name, spec in _compose("compose.yaml").items():
        for key in ("user", "cap_add", "privileged", "security_opt"):
            assert key not in spec, (name, key)
        assert "ALLOW_WEAK_SANDBOX" not in str(spec.get("environment", {})), name
    for container in _executors(_k8s("qrelay.yaml")):
        assert "securityContext" not in container
        assert "ALLOW_WEAK_SANDBOX" not in str(container.get("env", []))


def test_isolated_compose_grants_what_the_sandbox_needs_with_real_settings() -> None:
    services = _compose("compose.yaml", "compose.isolated.yaml")
    executors = {k: v for k, v in services.items() if k.startswith("executor")}
    assert len(executors) == 2
    for name, spec in executors.items():
        assert spec["user"] == "0:0", name
        assert set(spec["cap_add"]) >= NEEDED_CAPS, name
        assert "cap_drop" not in spec, "Docker's default capabilities are needed"
        assert "privileged" not in spec
        assert {"apparmor=unconfined", "systempaths=unconfined"} <= set(spec["security_opt"])
        assert spec["entrypoint"] == ["/usr/local/bin/qrelay-sandbox-entrypoint"]
        assert spec["command"][:2] == ["executor", "serve"], "compose.yaml's command is kept"
        fields = _sandbox_fields(spec["environment"])
        assert set(fields) <= set(SandboxSettings.model_fields), fields
        SandboxSettings(**fields)  # every value valid
        assert fields["allow_weak_sandbox"] == "false"
        lock_dir = fields["uid_lock_dir"]
        assert f"{lock_dir}:{lock_dir}" in spec["volumes"], "host-wide uid locks"


def test_isolated_k8s_executor_grants_what_the_sandbox_needs_with_real_settings() -> None:
    (container,) = _executors(_k8s("executor-isolated.yaml"))
    security = container["securityContext"]
    assert security["runAsUser"] == 0
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert NEEDED_CAPS | {"SETUID", "SETGID", "CHOWN", "KILL"} <= set(
        security["capabilities"]["add"]
    )
    assert security["appArmorProfile"] == {"type": "Unconfined"}
    assert security["procMount"] == "Unmasked"
    assert container["command"] == ["/usr/local/bin/qrelay-sandbox-entrypoint"]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    fields = _sandbox_fields(env)
    assert set(fields) <= set(SandboxSettings.model_fields), fields
    SandboxSettings(**fields)
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["uid-locks"] == fields["uid_lock_dir"]


@pytest.mark.parametrize("doc", ["compose.isolated.yaml", "k8s/executor-isolated.yaml"])
def test_isolated_variants_document_each_requirement(doc: str) -> None:
    text = (DEPLOY / doc).read_text()
    for needed in ("SYS_ADMIN", "SETUID", "AppArmor", "seccomp", "cgroup", "/proc", "uid"):
        assert needed.lower() in text.lower(), needed
