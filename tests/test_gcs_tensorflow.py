"""TensorBoard event files land in the bucket through TensorFlow's own GCS client (the TensorFlow path).

The trainers' metric writer (clu's `create_default_writer`) writes TensorBoard summaries with TensorFlow, whose
gs:// file system has no endpoint setting. The outer test runs this file as a script inside new network and mount
namespaces (`unshare -n -m`): only loopback, and /etc/hosts (there alone) mapping the Google storage host names to
127.0.0.1, where tests/gcs_tensorflow.py's TLS front (trusted through CURL_CA_BUNDLE) forwards to a local
fake-gcs-server. Inside, nothing skips: the namespace is checked first (no interface but `lo`, the metadata server
and a public address unreachable at once, the names resolve to 127.0.0.1); then scalars and an image are written to
gs://bucket/run/logs and read back through tf.io.gfile and from the emulator's own files on disk, and parsed.
Where this machine cannot create the namespaces (not root) or has no openssl, the outer test skips.
"""

from __future__ import annotations

import errno
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import time

import gcs_tensorflow
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAINERS = ("dcae_jax/autoencoder/train.py", "dcae_jax/diffusion/train.py")
DONE = "TENSORFLOW-GCS-OK"

# What the inner script writes: train/* scalars at steps 1..3 and one image at step 3.
SCALARS = {
    1: {"train/loss": 0.75, "train/learning_rate": 1e-4},
    2: {"train/loss": 0.5, "train/learning_rate": 2e-4},
    3: {"train/loss": 0.25, "train/learning_rate": 3e-4},
}
IMAGE_TAG, IMAGE_STEP = "eval/reconstructions", 3


def _checkerboard():
    import numpy as np

    board = (np.indices((8, 12)).sum(0) % 2).astype(np.float32)  # 0/1: exact through the float -> uint8 PNG
    return np.stack([board, 1 - board, board], axis=-1)  # (8, 12, 3), values in [0, 1] like the trainer's grids


def _event_files(objects: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in objects.rglob("*") if p.is_file() and "events.out.tfevents" in p.name)


def test_trainers_create_their_writer_with_loop_create_writer():
    """The TensorFlow test below calls the writer the trainers use (`loop.create_writer`, clu's default writer); if a
    trainer changes how it makes its writer, this fails so that the test is pointed at the new one."""
    for rel in TRAINERS:
        text = (ROOT / rel).read_text()
        assert re.search(r"\bloop\.create_writer\(workdir\)", text), (
            f"{rel} no longer makes its metric writer with loop.create_writer(workdir): point "
            "tests/test_gcs_tensorflow.py's inner script at the writer it uses now"
        )
    assert re.search(r"\bmetric_writers\.create_default_writer\(", (ROOT / "dcae_jax/training/loop.py").read_text())


def test_tensorboard_event_files_land_in_the_bucket_through_tensorflow(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed for the emulator's certificate")
    hosts = gcs_tensorflow.hosts_file(tmp_path / "hosts")
    work, cwd, home, tmp = (tmp_path / d for d in ("inner", "cwd", "home", "tmp"))
    for d in (work, cwd, home, tmp):
        d.mkdir()
    cert, key = gcs_tensorflow.make_certificate(tmp_path / "tls")
    cmd = gcs_tensorflow.namespace_command(hosts, [sys.executable, str(pathlib.Path(__file__)), str(work), str(cert),
                                                   str(key)])  # fmt: skip
    if cmd is None:
        pytest.skip("cannot create network and mount namespaces here (unshare -n -m needs root); needs ip and mount")
    # An explicit environment: no proxy variables, no credentials, HOME and TMPDIR in tmp_path.
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "TMPDIR": str(tmp),
        "LANG": "C.UTF-8",
        "PYTHONPATH": str(ROOT),
        "JAX_PLATFORMS": "cpu",
        "TF_CPP_MIN_LOG_LEVEL": "1",
        **gcs_tensorflow.environment(cert),
    }
    start = time.monotonic()
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-8000:]
    assert DONE in r.stdout, out[-8000:]
    # Seen from outside the namespace too: the event file is in the emulator's bucket folder, not under the cwd.
    (event_file,) = _event_files(work / "objects" / gcs_tensorflow.BUCKET)
    assert event_file.stat().st_size > 0
    assert not list(cwd.rglob("gs:*")), list(cwd.rglob("*"))
    print(r.stdout.strip().splitlines()[-1], f"({time.monotonic() - start:.1f} s)")


# ----------------------------------------------------------------------------------------------
# The inner script: runs inside the namespaces, started by the test above. Nothing here skips.


def _check_namespace() -> None:
    reason = gcs_tensorflow.why_not_here()  # only `lo`; both names resolve to 127.0.0.1 only; the environment
    assert reason is None, reason
    for host, port in (("169.254.169.254", 80), ("142.250.0.1", 443), ("8.8.8.8", 53)):
        t = time.monotonic()
        with pytest.raises(OSError) as err:
            socket.create_connection((host, port), timeout=2).close()
        assert err.value.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH), (host, err.value)
        assert time.monotonic() - t < 1, f"{host}: failed, but not at once"
    with pytest.raises(OSError):
        socket.getaddrinfo("metadata.google.internal", 80)


def _scalars_and_images(events) -> tuple[dict, dict]:
    import tensorflow as tf

    scalars, images = {}, {}
    for event in events:
        for v in event.summary.value:
            plugin = v.metadata.plugin_data.plugin_name
            if plugin == "scalars":
                scalars.setdefault(event.step, {})[v.tag] = float(tf.make_ndarray(v.tensor))
            elif plugin == "images":
                images[(event.step, v.tag)] = tf.io.decode_png(v.tensor.string_val[2]).numpy()
    return scalars, images


def _inner(work: pathlib.Path, cert: pathlib.Path, key: pathlib.Path) -> None:
    start = time.monotonic()
    _check_namespace()
    requests: list[tuple[str, str, int]] = []
    objects = work / "objects"
    with gcs_tensorflow.emulator(objects, cert, key, requests=requests) as bucket:
        import numpy as np
        import tensorflow as tf
        from tensorboard.backend.event_processing import event_file_loader

        from dcae_jax.runtime import paths
        from dcae_jax.training import loop

        # The trainers' writer, made as they make it (their workdir through `paths.path`; see
        # test_trainers_create_their_writer_with_loop_create_writer). etils.epath uses TensorFlow's gs:// here.
        logdir = f"{bucket}/run/logs"
        workdir = paths.path(logdir, "workdir")
        assert str(workdir) == logdir, workdir  # not pathlib's "gs:/bucket/..."
        workdir.mkdir(parents=True, exist_ok=True)
        writer = loop.create_writer(workdir)
        for step, values in SCALARS.items():
            writer.write_scalars(step, values)
        image = _checkerboard()
        writer.write_images(IMAGE_STEP, {IMAGE_TAG: image[None]})
        writer.flush()
        writer.close()

        # Through TensorFlow's GCS client.
        (gs_file,) = tf.io.gfile.glob(f"{logdir}/events.out.tfevents.*")
        assert tf.io.gfile.listdir(logdir) == [gs_file.rsplit("/", 1)[1]], tf.io.gfile.listdir(logdir)
        with tf.io.gfile.GFile(gs_file, "rb") as f:
            via_tf = f.read()
        from_gs = list(tf.compat.v1.train.summary_iterator(gs_file))

        # The emulator's own files: the object is in the bucket's folder, byte for byte.
        (disk_file,) = _event_files(objects / gcs_tensorflow.BUCKET)
        assert disk_file.read_bytes() == via_tf, (len(via_tf), disk_file.stat().st_size)
        from_disk = list(event_file_loader.LegacyEventFileLoader(str(disk_file)).Load())  # as written

        # The TLS front's fixes as TensorFlow's folder operations need them: empty uploads (a folder's placeholder
        # object) and a folder rename (asks the bucket's storageLayout first).
        tf.io.gfile.makedirs(f"{bucket}/run/staging")
        with tf.io.gfile.GFile(f"{bucket}/run/staging/note.txt", "w") as f:
            f.write("moved")
        tf.io.gfile.rename(f"{bucket}/run/staging", f"{bucket}/run/moved")
        with tf.io.gfile.GFile(f"{bucket}/run/moved/note.txt") as f:
            assert f.read() == "moved"
        assert not tf.io.gfile.exists(f"{bucket}/run/staging/note.txt")
        assert ("GET", f"/storage/v1/b/{gcs_tensorflow.BUCKET}/storageLayout", 200) in requests, requests

    assert [e.SerializeToString() for e in from_gs] == [e.SerializeToString() for e in from_disk]
    assert from_disk[0].file_version.startswith("brain.Event:"), from_disk[0]
    scalars, images = _scalars_and_images(from_disk)
    expected = {s: {k: float(np.float32(v)) for k, v in vals.items()} for s, vals in SCALARS.items()}
    assert scalars == expected, scalars
    assert list(images) == [(IMAGE_STEP, IMAGE_TAG)], list(images)
    np.testing.assert_array_equal(images[(IMAGE_STEP, IMAGE_TAG)], (image * 255).astype(np.uint8))

    # TensorFlow's traffic went through the TLS front (names -> 127.0.0.1): uploads of the event file included.
    uploads = [r for r in requests if r[1].startswith(f"/upload/storage/v1/b/{gcs_tensorflow.BUCKET}/o")]
    assert any("events.out.tfevents" in path for _, path, _ in uploads), requests
    assert all(status < 500 for *_, status in requests), requests
    # Nothing went to a local folder named "gs:" (pathlib-style "gs:/bucket/..." or a failed scheme lookup).
    assert not os.path.exists("gs:") and not any(p.startswith("gs:") for p in os.listdir(".")), os.listdir(".")
    print(f"{DONE}: {len(from_disk)} events, {len(via_tf)} bytes at {gs_file}, {len(requests)} requests through the "
          f"TLS front, inner {time.monotonic() - start:.1f} s")  # fmt: skip


if __name__ == "__main__":
    _inner(*map(pathlib.Path, sys.argv[1:4]))
