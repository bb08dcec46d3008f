"""TLS from settings (issue 12.3): HTTPS + WSS and gRPC over TLS with mTLS, and keys on top, with a
throwaway CA made by the openssl CLI in the test, over loopback."""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import time
from pathlib import Path

import grpc
import httpx
import pytest
from websockets.sync.client import connect

from tests.conftest import free_port, start_process
from worldserve.api.gen import worldserve_pb2 as pb
from worldserve.api.gen import worldserve_pb2_grpc as pbg

pytestmark = pytest.mark.e2e
KEY = "tls-key-0123456789"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(d: Path) -> dict[str, Path]:
    """CA, a server cert for 127.0.0.1/localhost and a client cert, all EC P-256 PEM files in `d`."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=test-ca",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=d)
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"),
                      ("client", "extendedKeyUsage=clientAuth\n")):
        (d / f"{name}.ext").write_text(ext)
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext", cwd=d)
    return {n: d / n for n in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


def _ctx(pki) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pki["ca.pem"]))


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.fail("the openssl CLI is needed to make the test certificates")
    d = tmp_path_factory.mktemp("tls")
    pki = make_pki(d)
    hp, gp = free_port(), free_port()
    env = {"WORLDSERVE_SERVER__TLS_CERT": str(pki["server.pem"]), "WORLDSERVE_SERVER__TLS_KEY": str(pki["server.key"]),
           "WORLDSERVE_SERVER__TLS_CLIENT_CA": str(pki["ca.pem"]), "WORLDSERVE_AUTH__API_KEYS": KEY}
    log = d / "serve.log"
    proc = start_process(["serve", "--http-port", str(hp), "--grpc-port", str(gp), "--max-slots", "4"], log, env)
    base = f"https://127.0.0.1:{hp}"
    t0 = time.time()
    while True:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(base + "/readyz", verify=_ctx(pki), timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.time() - t0 < 180, log.read_text()[-3000:]
        time.sleep(0.2)
    yield base, f"127.0.0.1:{gp}", pki
    proc.terminate()
    proc.wait(20)


def test_https_and_wss(tls_server):
    base, _, pki = tls_server
    ca = _ctx(pki)
    with pytest.raises(httpx.HTTPError):  # plain HTTP on the TLS port is not served
        httpx.get(base.replace("https", "http", 1) + "/readyz", timeout=3)
    assert httpx.get(base + "/v1/models", verify=ca).status_code == 401
    r = httpx.get(base + "/v1/models", verify=ca, headers={"authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.json()["models"][0]["name"] == "tiny"
    ctx = _ctx(pki)
    url = base.replace("https", "wss", 1) + "/v1/models/tiny/session"
    with connect(url, ssl=ctx, additional_headers={"authorization": f"Bearer {KEY}"}) as ws:
        ws.send(json.dumps({"type": "open", "context": []}))
        msg = json.loads(ws.recv(timeout=10))
        assert msg["type"] == "error" and msg["field"] == "context"


def test_grpc_mtls(tls_server):
    _, target, pki = tls_server
    md = (("authorization", f"Bearer {KEY}"),)
    creds = grpc.ssl_channel_credentials(root_certificates=pki["ca.pem"].read_bytes(),
                                         private_key=pki["client.key"].read_bytes(),
                                         certificate_chain=pki["client.pem"].read_bytes())
    stub = pbg.WorldModelServiceStub(grpc.secure_channel(target, creds))
    assert [m.name for m in stub.ListModels(pb.ListModelsRequest(), metadata=md, timeout=10).models] == ["tiny"]
    with pytest.raises(grpc.RpcError) as ei:  # the key is still required over mTLS
        stub.ListModels(pb.ListModelsRequest(), timeout=10)
    assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
    no_client_cert = grpc.ssl_channel_credentials(root_certificates=pki["ca.pem"].read_bytes())
    for ch in (grpc.secure_channel(target, no_client_cert), grpc.insecure_channel(target)):
        with pytest.raises(grpc.RpcError) as ei:
            pbg.WorldModelServiceStub(ch).ListModels(pb.ListModelsRequest(), metadata=md, timeout=5)
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
