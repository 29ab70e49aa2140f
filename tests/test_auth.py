"""Bearer-key authentication (service/auth.py): off by default, keys from a setting or a file of
SHA-256 digests, 401 with WWW-Authenticate, the probes and /metrics open; against the real
server, in process, through the CLI and in deploy/."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from pydantic import SecretStr

from models import BackbonesError, Settings
from service.auth import MIN_KEY_LENGTH, AuthMiddleware, accepts, bearer_token, key_digest, load_key_digests

from .conftest import ROOT, assert_clear_error, jpeg_bytes, registry_with
from .serving import Server, start_server, stop_server

# bentoml.metrics (used by service/metrics.py) warns that it is deprecated
pytestmark = pytest.mark.filterwarnings("ignore:bentoml.metrics module is deprecated:DeprecationWarning")

KEY_A = "key-a-" + "0123456789abcdef"  # from the setting
KEY_B = "key-b-" + "fedcba9876543210"  # from the file, as its digest


def digest_file(path: Path, *keys: str, extra: str = "") -> Path:
    lines = [f"{hashlib.sha256(k.encode()).hexdigest()}  # {i}" for i, k in enumerate(keys)]
    path.write_text("# keys of the service\n\n" + "\n".join(lines) + "\n" + extra)
    return path


# -- the pieces ---------------------------------------------------------------------------------------


def test_keys_come_from_the_setting_and_the_file(tmp_path: Path) -> None:
    assert load_key_digests(Settings()) == ()  # off by default
    file = digest_file(tmp_path / "keys", KEY_B)
    digests = load_key_digests(Settings(api_keys=SecretStr(f" {KEY_A} ,,{KEY_A}"), api_keys_file=file))
    assert digests == (key_digest(KEY_A), key_digest(KEY_B))  # each once
    assert accepts(digests, KEY_A) and accepts(digests, KEY_B)
    assert not accepts(digests, KEY_A[:-1]) and not accepts(digests, "") and not accepts(digests, KEY_A + "x")
    # only digests are kept, never the keys
    assert KEY_A.encode() not in b"".join(digests)


def test_bad_key_settings_are_clear_errors_that_never_show_a_key(tmp_path: Path) -> None:
    short = "short-key"
    with pytest.raises(BackbonesError) as info:
        load_key_digests(Settings(api_keys=SecretStr(f"{KEY_A},{short}")))
    assert "BACKBONES_API_KEYS: 1 key(s) shorter than" in str(info.value)
    assert short not in str(info.value) and KEY_A not in str(info.value)
    assert short not in repr(Settings(api_keys=SecretStr(short)))  # nor does the settings object
    cases = {
        "missing": (tmp_path / "nope", "cannot read the API key file"),
        "not a digest": (digest_file(tmp_path / "a", KEY_B, extra=KEY_A + "\n"), "line 4 of"),
        "empty": (digest_file(tmp_path / "b"), "holds no key digest"),
    }
    for case, (path, message) in cases.items():
        with pytest.raises(BackbonesError, match="BACKBONES_API_KEYS_FILE") as info:
            load_key_digests(Settings(api_keys_file=path))
        assert message in str(info.value) and KEY_A not in str(info.value), case


def test_the_bearer_token_is_read_from_the_authorization_header() -> None:
    def token(*headers: tuple[bytes, bytes]) -> str | None:
        return bearer_token({"headers": list(headers)})

    assert token((b"authorization", b"Bearer abc")) == "abc"
    assert token((b"authorization", b"bearer   abc  ")) == "abc"
    assert token((b"authorization", b"Basic abc")) is None
    assert token((b"authorization", b"Bearer")) is None
    assert token((b"x-api-key", b"abc")) is None


def answered(app: AuthMiddleware, path: str, key: str | None = None) -> tuple[int, dict[str, str], Any]:
    """The status, headers and JSON body (None if empty) ``app`` answers a GET of ``path`` with."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    headers = [(b"authorization", f"Bearer {key}".encode())] if key else []
    asyncio.run(app({"type": "http", "method": "GET", "path": path, "headers": headers}, receive, send))
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return (
        sent[0]["status"],
        {k.decode(): v.decode() for k, v in sent[0].get("headers", [])},
        json.loads(body) if body else None,
    )


async def ok_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def test_the_middleware_answers_401_except_on_open_paths() -> None:
    app = AuthMiddleware(ok_app, digests=(key_digest(KEY_A),), open_paths=frozenset({"/livez"}))
    status, headers, body = answered(app, "/models")
    assert status == 401 and headers["www-authenticate"] == 'Bearer realm="backbones"'
    assert "Authorization: Bearer" in body["error"]
    status, headers, body = answered(app, "/models", "wrong-key-0123456789")
    assert status == 401 and 'error="invalid_token"' in headers["www-authenticate"]
    assert body == {"error": "invalid API key"}
    assert answered(app, "/models", KEY_A)[0] == 200
    assert answered(app, "/livez")[0] == 200
    assert answered(app, "/metrics")[0] == 401  # open paths are configured: here /metrics is not one
    off = AuthMiddleware(ok_app, digests=(), open_paths=frozenset())
    assert answered(off, "/models")[0] == 200  # no key configured: nothing is checked


# -- the real server ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def locked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("auth")
    server = start_server(
        registry_with(tmp / "bentoml", "tiny_cnn").home,
        ["tiny_cnn"],
        tmp / "server.log",
        BACKBONES_WORKERS="1",
        BACKBONES_API_KEYS=KEY_A,
        BACKBONES_API_KEYS_FILE=str(digest_file(tmp / "keys", KEY_B)),
    )
    yield server
    stop_server(server)


@pytest.mark.slow
def test_a_locked_server_needs_a_key_except_for_probes_and_metrics(locked: Server) -> None:
    url = locked.url
    for path in ("/livez", "/readyz", "/metrics"):
        assert httpx.get(url + path).status_code == 200, path
    for method, path in (("GET", "/models"), ("GET", "/docs.json"), ("GET", "/"), ("GET", "/nope"), ("POST", "/embed")):
        r = httpx.request(method, url + path)
        assert r.status_code == 401, (path, r.text)
        assert r.headers["www-authenticate"].startswith("Bearer ") and r.json()["error"], path
    wrong = httpx.post(url + "/classify", files={"image": ("a.jpg", jpeg_bytes(0))}, headers=bearer("x" * 20))
    assert wrong.status_code == 401 and wrong.json() == {"error": "invalid API key"}
    assert wrong.headers["connection"] == "close"  # answered before its body was read
    for key in (KEY_A, KEY_B):
        r = httpx.post(url + "/classify", files={"image": ("a.jpg", jpeg_bytes(0))}, headers=bearer(key))
        assert r.status_code == 200 and r.json()["model"].startswith("tiny_cnn:"), r.text
    assert httpx.get(url + "/nope", headers=bearer(KEY_A)).status_code == 404  # a key first, then routing
    doc = httpx.get(url + "/docs.json", headers=bearer(KEY_B)).json()
    assert "401" in doc["paths"]["/classify"]["post"]["responses"]
    assert "401" not in doc["paths"]["/livez"]["get"]["responses"]
    assert locked.metric("bentoml_service_request_total", http_response_code="401") >= 6
    log = locked.log.read_text()
    assert "API keys required (2)" in log and KEY_A not in log and KEY_B not in log


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_serve_refuses_a_bad_key_setting_in_one_line(run_cli: Callable[..., Any], tmp_path: Path) -> None:
    proc = run_cli("serve", "--model", "tiny_cnn", extra_env={"BACKBONES_API_KEYS": "tooshort"}, timeout=60)
    assert_clear_error(proc, "BACKBONES_API_KEYS: 1 key(s) shorter than")
    assert "tooshort" not in proc.stderr + proc.stdout
    proc = run_cli("serve", extra_env={"BACKBONES_API_KEYS_FILE": str(tmp_path / "missing")}, timeout=60)
    assert_clear_error(proc, "BACKBONES_API_KEYS_FILE: cannot read the API key file")


# -- deploy/ ----------------------------------------------------------------------------------------------


def test_deploy_takes_keys_from_an_optional_secret() -> None:
    deployment = yaml.safe_load((ROOT / "deploy" / "base" / "deployment.yaml").read_text())
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    ref = env[Settings.env_name("api_keys")]["valueFrom"]["secretKeyRef"]
    assert ref["optional"] is True  # no Secret: no key required, the pod still starts
    readme = (ROOT / "README.md").read_text()
    assert f"secret generic {ref['name']}" in readme and f"--from-literal={ref['key']}=" in readme
    assert container["args"][container["args"].index("--host") + 1] == "0.0.0.0"
    probes = [container[p]["httpGet"]["path"] for p in ("readinessProbe", "livenessProbe", "startupProbe")]
    assert set(probes) <= Settings().open_paths()  # the kubelet sends no key
    # nor does it as KServe's predictor, which probes the Open Inference Protocol's health routes
    (isvc,) = [d for d in yaml.safe_load_all((ROOT / "deploy" / "kserve" / "inferenceservice.yaml").read_text()) if d]
    (predictor,) = isvc["spec"]["predictor"]["containers"]
    kserve_probes = {predictor[p]["httpGet"]["path"] for p in ("readinessProbe", "livenessProbe", "startupProbe")}
    assert kserve_probes <= Settings().open_paths()


def test_the_minimum_key_length_is_stated_where_keys_are_described() -> None:
    assert MIN_KEY_LENGTH >= 16
    assert "16 characters" in (ROOT / "README.md").read_text()
