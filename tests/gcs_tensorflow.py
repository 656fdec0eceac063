"""TensorFlow's own Cloud Storage client (tf.io.gfile, tf.summary) against a local emulator, without a byte leaving
loopback.

TensorFlow's GCS file system has no endpoint setting: it always talks to https://www.googleapis.com (metadata,
uploads) and https://storage.googleapis.com (downloads) through libcurl. So, inside a namespace that has only
loopback (`unshare -n -m`, see tests/test_gcs_tensorflow.py):

- a private copy of /etc/hosts, bind-mounted over /etc/hosts in that mount namespace only, maps both names to
  127.0.0.1 (`hosts_file`);
- a self-signed certificate for both names (`make_certificate`) is trusted through `CURL_CA_BUNDLE`;
- a small TLS front on 127.0.0.1:443 (`TLSFront`) forwards to fake-gcs-server (tests/gcs_emulator.py's binary) on
  plain http, smoothing the three places where TensorFlow and the emulator disagree (see `_Handler`);
- `ENV` switches off every credential search (no metadata server, no gcloud files).

`why_not_here()` refuses unless this process is in such a namespace, and `emulator()` will not start otherwise.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import os
import pathlib
import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
import urllib.request

import gcs_emulator

NAMES = ("www.googleapis.com", "storage.googleapis.com")  # the only hosts TensorFlow's GCS client talks to
PORT = gcs_emulator.PORT  # the emulator's plain-http port (inside the namespace nothing else uses it)
BUCKET = "dcae-tf-test"
PROJECT = "test-project"

# TensorFlow's GCS client: a fixed token instead of any credential search, no metadata server, few retries (a
# failure shows in seconds, not minutes). `environment()` adds CURL_CA_BUNDLE.
ENV = {
    "GOOGLE_AUTH_TOKEN_FOR_TESTING": "dummy",
    "NO_GCE_CHECK": "true",
    "GCE_METADATA_HOST": "127.0.0.1:1",
    "GCE_METADATA_IP": "127.0.0.1:1",
    "GCE_METADATA_ROOT": "127.0.0.1:1",
    "GOOGLE_CLOUD_PROJECT": PROJECT,
    "GCS_RETRY_CONFIG_MAX_RETRIES": "2",
    "no_proxy": "*",  # libcurl: never a proxy (the *_proxy variables are also left out of the environment)
    "NO_PROXY": "*",
}


def environment(cert: pathlib.Path) -> dict[str, str]:
    """`ENV` plus the certificate libcurl (TensorFlow's HTTP client) must trust."""
    return {**ENV, "CURL_CA_BUNDLE": str(cert)}


# ----------------------------------------------------------------------------------------------
# Outside the namespace: the files it needs.


def make_certificate(directory: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """A self-signed certificate (and its key) for both Google storage host names; returns (cert, key)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("openssl not found")
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "googleapis.pem", directory / "googleapis.key"
    san = ",".join(f"DNS:{n}" for n in NAMES)
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={NAMES[0]}",
         "-keyout", str(key), "-out", str(cert), "-addext", f"subjectAltName={san}"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def hosts_file(path: pathlib.Path) -> pathlib.Path:
    """A copy of /etc/hosts with both names mapped to 127.0.0.1 (any other line naming them dropped), to be
    bind-mounted over /etc/hosts inside the namespace's private mount namespace."""
    try:
        lines = pathlib.Path("/etc/hosts").read_text().splitlines()
    except OSError:
        lines = ["127.0.0.1 localhost"]
    kept = [ln for ln in lines if not any(n in ln.split("#")[0].split()[1:] for n in NAMES)]
    path.write_text("\n".join([*kept, f"127.0.0.1 {' '.join(NAMES)}", ""]))
    return path


def namespace_command(hosts: pathlib.Path, argv: list[str]) -> list[str] | None:
    """`argv` run in new network and mount namespaces: only loopback (brought up), and `hosts` over /etc/hosts
    there alone. None when this machine cannot make them (not root, no user namespaces) or lacks the tools."""
    unshare, ip, mount = shutil.which("unshare"), shutil.which("ip"), shutil.which("mount")
    if not (unshare and ip and mount):
        return None
    probe = subprocess.run([unshare, "-n", "-m", "sh", "-c", "mount --make-rprivate /"], capture_output=True)
    if probe.returncode != 0:
        return None
    script = 'mount --make-rprivate / && mount --bind "$0" /etc/hosts && ip link set lo up && exec "$@"'
    return [unshare, "-n", "-m", "sh", "-c", script, str(hosts), *argv]


# ----------------------------------------------------------------------------------------------
# Inside the namespace.


def why_not_here() -> str | None:
    """None when TensorFlow's gs:// client may be used in this process, else why not."""
    ifaces = gcs_emulator.interfaces()
    if ifaces != ["lo"]:
        return f"TensorFlow's gs:// client runs only in a loopback-only network namespace; here: {ifaces}"
    for name in NAMES:
        try:
            addrs = {info[4][0] for info in socket.getaddrinfo(name, 443, proto=socket.IPPROTO_TCP)}
        except OSError as e:
            return f"{name} does not resolve ({e}); /etc/hosts must map it to 127.0.0.1"
        if addrs != {"127.0.0.1"}:
            return f"{name} resolves to {sorted(addrs)}, not only 127.0.0.1 (/etc/hosts)"
    wrong = {k: os.environ.get(k) for k in ENV if os.environ.get(k) != ENV[k]}
    if wrong or not os.path.isfile(os.environ.get("CURL_CA_BUNDLE", "")):
        return f"the environment lacks gcs_tensorflow.environment(): {wrong}, CURL_CA_BUNDLE unset or missing"
    return None


def _wait_for_port(port: int, proc: subprocess.Popen | None, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            if (proc is not None and proc.poll() is not None) or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start on 127.0.0.1:{port}") from None
            time.sleep(0.05)


def _hop(name: str) -> bool:
    return name.lower() in {"connection", "keep-alive", "transfer-encoding", "te", "upgrade", "expect",
                            "proxy-connection", "content-length"}  # fmt: skip


class _Handler(http.server.BaseHTTPRequestHandler):
    """Forwards one request to the emulator; where TensorFlow and fake-gcs-server disagree:

    - TensorFlow's libcurl sends `Transfer-Encoding: identity` on an empty upload, which Go's server answers with
      501: hop-by-hop headers are not forwarded (the body is re-sent with its Content-Length);
    - the emulator's resumable-upload `Location` is an http:// URL (on the request's Host, www.googleapis.com, as
      forwarded here; port 80 is closed): it is rewritten to https://www.googleapis.com/... (back through this front);
    - TensorFlow asks `GET /storage/v1/b/<bucket>/storageLayout` (hierarchical namespace or not) before a directory
      rename; the emulator has no such route (404 fails the rename): answered here with a flat, regional layout.
    """

    protocol_version = "HTTP/1.1"
    server: TLSFront

    def log_message(self, format, *args):
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _reply(self, status: int, reason: str, headers: list[tuple[str, str]], data: bytes, length: int) -> None:
        self.send_response_only(status, reason)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        self.server.requests.append((self.command, self.path, status))

    def _forward(self) -> None:
        body = self._body()
        layout = re.fullmatch(r"/storage/v1/b/([^/?]+)/storageLayout(\?.*)?", self.path)
        if self.command == "GET" and layout:
            data = json.dumps({
                "kind": "storage#storageLayout", "bucket": layout[1], "location": "US-CENTRAL1",
                "locationType": "region", "hierarchicalNamespace": {"enabled": False},
            }).encode()  # fmt: skip
            self._reply(200, "OK", [("Content-Type", "application/json")], data, len(data))
            return
        headers = {k: v for k, v in self.headers.items() if not _hop(k)}
        if body or self.command in ("POST", "PUT", "PATCH"):
            headers["Content-Length"] = str(len(body))
        conn = http.client.HTTPConnection("127.0.0.1", self.server.upstream_port, timeout=60)
        try:
            conn.request(self.command, self.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            out = []
            for k, v in resp.getheaders():
                if _hop(k):
                    continue
                if k.lower() == "location":
                    v = re.sub(r"^http://[^/]+", f"https://{NAMES[0]}", v)
                out.append((k, v))
            length = int(resp.getheader("Content-Length") or 0) if self.command == "HEAD" else len(data)
            self._reply(resp.status, resp.reason, out, data, length)
        finally:
            conn.close()

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _forward


class TLSFront(http.server.ThreadingHTTPServer):
    """HTTPS on 127.0.0.1:`port` (the certificate's names resolve there), forwarding to the emulator's http port.
    `requests` records (method, path, status) of every request served."""

    daemon_threads = True

    def __init__(self, cert: pathlib.Path, key: pathlib.Path, upstream_port: int, port: int = 443):
        self.upstream_port = upstream_port
        self.requests: list[tuple[str, str, int]] = []
        super().__init__(("127.0.0.1", port), _Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        # The handshake happens on the handler's thread (first read), not in the accept loop.
        self.socket = ctx.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)

    def handle_error(self, request, client_address):
        pass  # a client that hangs up mid-request (libcurl closing an idle connection) is not an error here


def _create_bucket(bucket: str) -> None:
    """The bucket, made through the emulator's JSON API on plain http (no proxy, no credentials)."""
    req = urllib.request.Request(
        f"http://127.0.0.1:{PORT}/storage/v1/b?project={PROJECT}",
        data=json.dumps({"name": bucket}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(req, timeout=10) as r:
        if r.status != 200:
            raise RuntimeError(f"creating bucket {bucket}: HTTP {r.status}")


@contextlib.contextmanager
def emulator(
    root: pathlib.Path, cert: pathlib.Path, key: pathlib.Path, bucket: str = BUCKET, requests=None, memory=False
):
    """fake-gcs-server with its objects on disk under `root` (the bucket's objects land in `root/<bucket>/`), behind
    the TLS front on 127.0.0.1:443; yields "gs://<bucket>". `requests`, a list, receives what the front served.
    `memory`: objects in memory instead (the file system backend keeps empty folders after their objects are
    deleted and lists them as prefixes, which real Cloud Storage does not: a deleted folder would still "exist").
    Refuses to start outside the loopback-only namespace with the hosts mapping and environment."""
    reason = why_not_here()
    if reason:
        raise RuntimeError(reason)
    root.mkdir(parents=True, exist_ok=True)
    log = open(root.parent / "fake-gcs-server-tf.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [str(gcs_emulator.binary()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(PORT), "-backend",
         *(["memory"] if memory else ["filesystem", "-filesystem-root", str(root)]), "-external-url", f"http://127.0.0.1:{PORT}", "-public-host",
         NAMES[1], "-log-level", "warn"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    front = thread = None
    try:
        _wait_for_port(PORT, proc, "fake-gcs-server")
        _create_bucket(bucket)
        front = TLSFront(cert, key, PORT)
        if requests is not None:
            front.requests = requests
        thread = threading.Thread(target=front.serve_forever, name="gcs-tls-front", daemon=True)
        thread.start()
        yield f"gs://{bucket}"
    finally:
        if thread is not None:
            front.shutdown()
            thread.join(5)
        if front is not None:
            front.server_close()
        proc.kill()
        proc.wait()
        log.close()
