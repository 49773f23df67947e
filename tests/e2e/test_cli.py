"""The `lastguard` command as a user runs it: verify, dev-issuer, and the sidecar's logs."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import jwt
import pytest

from lastguard.sidecar.devissuer import DevIssuer
from tests.support import envoy_config
from tests.support.envoy import StartEnvoy
from tests.support.sidecar import PolicyWriter, StartSidecarProcess
from tests.support.upstream import UpstreamApp

pytestmark = pytest.mark.e2e

ISSUER = "https://idp.example"


def inline_policy(dev: DevIssuer) -> dict[str, Any]:
    return {
        "apiVersion": "lastguard.dev/v1alpha1",
        "kind": "JWTPolicy",
        "metadata": {"name": "api"},
        "spec": {
            "issuers": [
                {
                    "issuer": ISSUER,
                    "jwks": json.dumps(dev.jwks()),
                    "audiences": ["api"],
                    "outputClaimToHeaders": [{"header": "x-user", "claim": "sub"}],
                }
            ],
            "rules": [{"paths": ["/api/*"], "methods": ["POST"], "requiredScopes": ["write"]}],
        },
    }


def lastguard(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lastguard.sidecar.cli", *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=60,
        check=False,
    )


@pytest.fixture
def dev() -> DevIssuer:
    return DevIssuer(ISSUER)


def test_verify_explains_an_allow(dev: DevIssuer, write_policy: PolicyWriter) -> None:
    policy_file = write_policy(inline_policy(dev))
    token = dev.mint({"sub": "alice", "scope": "write"}, audience="api")
    result = lastguard(
        "verify", "--policy-file", str(policy_file), "--token", token,
        "--path", "/api/orders", "--method", "post",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["allowed"] is True and out["reason"] == "authenticated"
    assert out["policy"] == "default/api"
    assert out["rule"]["action"] == "Authenticate" and out["rule"]["required_scopes"] == ["write"]
    assert out["headers_to_set"] == {"x-user": "alice"}
    assert token not in result.stdout


@pytest.mark.parametrize(
    ("claims", "audience", "reason", "status"),
    [
        pytest.param({"scope": "read"}, "api", "insufficient_scope", 403, id="missing-scope"),
        pytest.param({"scope": "write"}, "other", "audience", 401, id="wrong-audience"),
    ],
)
def test_verify_explains_a_denial(
    dev: DevIssuer,
    write_policy: PolicyWriter,
    claims: dict[str, Any],
    audience: str,
    reason: str,
    status: int,
) -> None:
    policy_file = write_policy(inline_policy(dev))
    token = dev.mint(claims, audience=audience)
    result = lastguard(
        "verify", "--policy-file", str(policy_file), "--token", "-", "--path", "/api/x",
        "--method", "POST", stdin=token + "\n",
    )  # fmt: skip
    assert result.returncode == 1
    out = json.loads(result.stdout)
    assert (out["allowed"], out["reason"], out["status"]) == (False, reason, status)
    assert out["description"]


def test_verify_reports_an_invalid_policy_file(write_policy: PolicyWriter) -> None:
    policy_file = write_policy(
        "apiVersion: lastguard.dev/v1alpha1\nkind: JWTPolicy\n"
        "metadata: {name: x}\nspec: {issuers: [{issuer: nope}]}\n"
    )
    result = lastguard("verify", "--policy-file", str(policy_file), "--token", "x")
    assert result.returncode == 1
    out = json.loads(result.stdout)
    assert out["reason"] == "invalid_policy"
    assert any("spec.issuers[0].issuer" in p for p in out["problems"])


def test_dev_issuer_mint_prints_a_token() -> None:
    result = lastguard("dev-issuer", "--mint", "--issuer", ISSUER, "--claims", '{"sub": "bob"}')
    assert result.returncode == 0, result.stderr
    claims = jwt.decode(result.stdout.strip(), options={"verify_signature": False})
    assert claims["sub"] == "bob" and claims["iss"] == ISSUER


def test_dev_issuer_serves_jwks_and_discovery() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "lastguard.sidecar.cli", "dev-issuer", "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        with urllib.request.urlopen(info["jwks_uri"], timeout=5) as reply:
            assert len(json.load(reply)["keys"]) == 3
        discovery = f"{info['issuer']}/.well-known/openid-configuration"
        with urllib.request.urlopen(discovery, timeout=5) as reply:
            assert json.load(reply)["jwks_uri"] == info["jwks_uri"]
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0


def test_sidecar_process_logs_one_json_line_per_denial_without_tokens(
    dev: DevIssuer,
    write_policy: PolicyWriter,
    start_sidecar_process: StartSidecarProcess,
    start_envoy: StartEnvoy,
    upstream: UpstreamApp,
) -> None:
    sidecar = start_sidecar_process(write_policy(inline_policy(dev)))
    envoy = start_envoy(
        [envoy_config.ext_authz_listener(authz_port=sidecar.port, upstream_port=upstream.port)]
    )
    expired = dev.mint({"sub": "alice"}, audience="api", lifetime=-3600)
    assert envoy.request("GET", "/api/x?q=1", {"authorization": f"Bearer {expired}"}).status == 401
    assert envoy.request("GET", "/api/y").status == 401

    def denials() -> list[dict[str, Any]]:
        return [r for r in sidecar.log_records() if r.get("decision") == "deny"]

    deadline = time.monotonic() + 5
    while len(denials()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    expired_line, missing_line = denials()[:2]
    assert expired_line["reason"] == "expired" and expired_line["status"] == 401
    assert expired_line["path"] == "/api/x" and expired_line["policy"] == "default/api"
    assert missing_line["reason"] == "missing_token"
    log = sidecar.log_text()
    assert expired not in log and expired.split(".")[1] not in log
    assert all(set(r) >= {"ts", "level", "logger", "msg"} for r in sidecar.log_records())


def test_cli_rejects_bad_flags(tmp_path: Path) -> None:
    result = lastguard("sidecar", "--policy-file", str(tmp_path / "p.yaml"), "--label", "novalue")
    assert result.returncode == 2
    assert "expected KEY=VALUE, got 'novalue'" in result.stderr


def test_sidecar_command_does_not_load_the_operator_stack() -> None:
    code = (
        "import sys\n"
        "from lastguard.sidecar import cli\n"
        "try:\n    cli.main(['sidecar', '--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('kopf', 'kubernetes') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_operator_help_lists_operator_and_webhook_flags() -> None:
    result = lastguard("--log-level", "warning", "operator", "--help")
    assert result.returncode == 0, result.stderr
    for flag in ("--leader-election", "--webhook-cert", "--inject-image", "--tls-cert"):
        assert flag in result.stdout
