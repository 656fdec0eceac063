"""Runs every test marked `gcs` against a local Cloud Storage emulator inside a loopback-only network namespace.

Nothing may reach Google or the cloud metadata server: the inner tests refuse to run (skip) unless the namespace has
only `lo`, and the outer test fails if any of them skipped there. Where this machine cannot create a namespace
(`unshare -n` needs root or user namespaces), the outer test skips with that reason.
"""

import errno
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import time

import gcs_emulator
import gcs_tensorflow
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_gcs_tests_pass_inside_a_loopback_only_namespace(tmp_path):
    """Network + mount namespaces: only loopback, and /etc/hosts (there alone) sending Google's storage host names
    to the TLS front of tests/gcs_tensorflow.py, so TensorFlow's own GCS client (TensorBoard logs) is covered too."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed for the TLS front's certificate")
    hosts = gcs_tensorflow.hosts_file(tmp_path / "hosts")
    argv = [sys.executable, "-m", "pytest", "-q", "-m", "gcs", "-p", "no:cacheprovider", "--basetemp",
            str(tmp_path / "t"), "tests"]  # fmt: skip
    cmd = gcs_tensorflow.namespace_command(hosts, argv)
    if cmd is None:
        pytest.skip("cannot create network and mount namespaces here (unshare -n -m needs root)")
    cert, key = gcs_tensorflow.make_certificate(tmp_path / "tls")
    proxies = {k for k in os.environ if k.lower().endswith("_proxy")}
    env = {k: v for k, v in os.environ.items() if k not in proxies}
    env |= {**gcs_emulator.ENV, **gcs_tensorflow.environment(cert), gcs_emulator.KEY_ENV: str(key)}
    # CI time: the inner run keeps the outer run's compilation cache (tests/conftest.py): a job that the local tests
    # already compiled, or a resumed one, compiles nothing.
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    out = r.stdout + r.stderr
    summary = ([ln for ln in r.stdout.splitlines() if re.search(r"\d+ (passed|failed|error)", ln)] or [""])[-1]
    assert r.returncode == 0, out[-8000:]
    assert re.search(r"\d+ passed", summary), out[-4000:]
    assert "skipped" not in summary, out[-8000:]  # inside the namespace nothing may skip
    print(summary)


@pytest.mark.gcs
def test_nothing_leaves_loopback(gcs_dir):
    """The guard itself: in the namespace, the metadata server and a public address are unreachable at once."""
    assert gcs_emulator.interfaces() == ["lo"]
    for host in ("169.254.169.254", "142.250.0.1"):
        with pytest.raises(OSError) as err:
            socket.create_connection((host, 80), timeout=2)
        assert err.value.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH), err.value


QUICKSTART = [
    f"--config={ROOT}/configs/quickstart.py:steps1=6,steps2=2,steps3=2,lpips_steps1=0",
    # Small and free of perceptual networks (their weights are a separate, offline-tested matter): the chain's
    # storage is the point here: checkpoints, exports, eval tables, curves, grids and TensorBoard logs on gs://.
    "--config.phase1.checkpoint_every=2",
    "--config.phase2.loss.lpips_weight=0",
    "--config.phase3.eval_rfid=False",
    *[f"--config.phase{k}.eval_lpips=False" for k in (1, 2, 3)],
    *[f"--config.phase{k}.eval_batch_size=3" for k in (1, 2, 3)],
]


@pytest.mark.gcs
def test_quickstart_chain_on_gcs_resumes_after_a_kill_and_exports(gcs_dir, tmp_path):
    """README's main job with --workdir=gs://...: killed (SIGKILL) once phase 1 has a checkpoint in the bucket, run
    again, it resumes from that checkpoint and finishes the chain; everything lands in the bucket, nothing locally."""
    from etils import epath

    from dcae_jax.autoencoder.pretrained import DCAE

    workdir = epath.Path(f"{gcs_dir}/quickstart")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "dcae_jax.main", *QUICKSTART, f"--workdir={workdir}"]
    log = open(tmp_path / "first.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        while not (workdir / "phase1" / "checkpoints" / "2" / "commit_success.txt").exists():
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "no checkpoint in the bucket after 10 min"
            time.sleep(0.5)
    finally:
        proc.kill()
        proc.wait()
        log.close()
    assert not (workdir / "phase1" / "eval.json").exists()  # killed mid-phase

    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    assert re.search(r"resumed from step [2-6]\b", out), out[-6000:]
    assert f"model       {workdir}/export" in r.stdout and f"tensorboard --logdir {workdir}" in r.stdout
    for phase in ("phase1", "phase2", "phase3"):
        for name in ("eval.json", "metrics.jsonl", "curves.png", "trainable_params.md", "export/dcae_config.json"):
            assert (workdir / phase / name).exists(), f"{phase}/{name}"
        assert list((workdir / phase).glob("events.out.tfevents.*")), f"{phase}: no TensorBoard events in the bucket"
        assert list((workdir / phase / "samples").glob("*.png")), f"{phase}: no reconstruction grid"
    assert "| phase3 | 2 | 64 | 128 |" in (workdir / "eval.md").read_text()
    ae = DCAE.from_pretrained(f"{workdir}/export")
    assert ae.config.name == "quickstart-f16c16" and np.isfinite(ae.encode(np.zeros((1, 32, 32, 3)))).all()
    assert not (tmp_path / "gs:").exists() and not list(tmp_path.rglob("*tfevents*"))
