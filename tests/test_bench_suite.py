"""`python -m bench.suite --scale smoke` runs end to end and writes results.json / results.md of the documented schema.

Schema and sanity only (keys, types, finite positive times, ratio = reference / ours): never timings, which depend on
the machine and its load. One smoke run (~30 s on 2 cores) is shared by the tests of this module.
"""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

from bench import suite
from dcae_jax.runtime import compute

REPO = pathlib.Path(__file__).resolve().parents[1]
ROW_KEYS = {
    "name": str,
    "kind": str,
    "model": str,
    "resolution": int,
    "dtype": str,
    "batch": int,
    "status": str,
    "seconds": dict,
    "memory_bytes": dict,
}
NULLABLE_NUMBERS = ("ratio", "flops", "flops_per_s", "fraction_of_peak")


def _run(*args: str, timeout: int = 480, module: str = "bench.suite") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite")
    doc = out / "performance.md"  # a generated block from an earlier run, between hand-written text
    begin, end = suite.docs_markers("smoke")
    doc.write_text(f"# Perf\n\nprose before\n\n{begin}\nOLD TABLE\n{end}\n\nprose after\n")
    proc = _run("--scale", "smoke", "--out", str(out), "--docs", str(doc))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_results_json_schema(smoke):
    out, _ = smoke
    result = json.loads((out / "results.json").read_text())
    assert result["schema_version"] == 1
    assert result["scale"] == "smoke" and result["complete"] is True
    assert isinstance(result["command"], list) and "bench.suite" in result["command"]
    assert "--scale" in result["command"] and "smoke" in result["command"]
    assert result["date"].endswith("Z") and result["date"][:4].isdigit()
    m = result["machine"]
    assert isinstance(m["processor"], str) and m["processor"].strip()
    assert isinstance(m["vector_extensions"], list) and all(isinstance(f, str) for f in m["vector_extensions"])
    assert isinstance(m["cores"], int) and m["cores"] >= 1
    assert m["memory_gb"] is None or m["memory_gb"] > 0
    assert "accelerator" in m and m["conv_kernel_grad"] in ("dots", "xla")
    assert m["conv3x3"] == compute.conv3x3()
    # The children own their processes: the allocator policy applies to them (on a CPU, "reuse" unless the
    # environment set glibc's malloc tunables or DCAE_JAX_HOST_MALLOC).
    expected = compute.host_malloc_choice(cpu=True)
    assert m["host_malloc"] == expected
    for pkg in ("python", "jax", "jaxlib", "flax", "torch", "diffusers", "numpy"):
        assert isinstance(result["versions"][pkg], str) and result["versions"][pkg], pkg

    rows = result["rows"]
    assert rows
    for row in rows:
        for key, typ in ROW_KEYS.items():
            assert isinstance(row[key], typ), (row["name"], key)
        assert row["status"] in ("ok", "error", "skipped")
        for key in NULLABLE_NUMBERS:
            assert row[key] is None or isinstance(row[key], int | float), (row["name"], key)
        assert set(row["seconds"]) == {"dcae_jax", "reference"}
        assert {"dcae_jax", "reference", "process_peak_rss"} <= set(row["memory_bytes"])
        if row["status"] != "ok":
            assert row["reason"], row["name"]
            continue
        ours, ref = row["seconds"]["dcae_jax"], row["seconds"]["reference"]
        assert math.isfinite(ours) and ours > 0, row["name"]
        if row["name"].endswith(("f64 only remat full train", "f64 only remat full sample")):  # ours alone
            assert ref is None and row["ratio"] is None and row["reference_flops"] is None, row["name"]
            assert row["flops"] > 0 and row["memory_bytes"]["dcae_jax"] > 0
            assert 1 <= row["steps_per_timing"]["dcae_jax"] <= 3, row  # back to back, up to the row's steps=3
            if row["name"].endswith("train"):  # the timed step recomputes its blocks: more than the model's FLOPs
                assert row["remat"] == "full" and row["executed_flops"] > 1.2 * row["flops"], row
            continue
        assert math.isfinite(ref) and ref > 0, row["name"]
        assert row["ratio"] == pytest.approx(ref / ours, rel=1e-9), row["name"]
        assert row["flops"] > 0 and row["flops_per_s"] == pytest.approx(row["flops"] / ours, rel=1e-9)
        assert row["fraction_of_peak"] is None  # no known peak for a CPU
        assert row["memory_bytes"]["process_peak_rss"] > 0
        assert row["memory_bytes"]["dcae_jax"] > 0, row["name"]  # XLA's compiled footprint of our program
        if row["kind"].startswith("uvit"):  # the reference is the same UViT on SD-VAE latents: more tokens
            assert row["steps_per_timing"] == {"dcae_jax": 1, "reference": 1}, row["name"]  # the row's steps=1
            assert row["memory_bytes"]["reference"] > row["memory_bytes"]["dcae_jax"], row["name"]
            assert row["reference_flops"] > row["flops"], row["name"]

    ok_kinds = {r["kind"] for r in rows if r["status"] == "ok"}
    assert "autoencoder encode+decode" in ok_kinds
    assert "train step" in ok_kinds
    assert {"uvit train step", "uvit sample step"} <= ok_kinds
    f64_only = "uvit uvit-tiny 128 float32 b4 f64 only remat full"
    assert {f"{f64_only} train", f"{f64_only} sample"} <= {r["name"] for r in rows if r["status"] == "ok"}
    assert "high-res decode" in ok_kinds
    ok = {r["name"]: r for r in rows if r["status"] == "ok"}
    # Phase 3 (frozen model + PatchGAN) in bf16 against its PyTorch step under autocast.
    assert ok["train p3 tiny 32 bfloat16"]["dtype"] == "bfloat16", sorted(ok)


def test_highres_rows_score_every_method_against_the_exact_decode(smoke):
    out, _ = smoke
    rows = [r for r in json.loads((out / "results.json").read_text())["rows"] if r["kind"] == "high-res decode"]
    assert [r["name"].rsplit(" ", 1)[-1] for r in rows] == ["tiled", "(exact)"]
    for r in rows:
        h = r["highres"]
        assert r["status"] == "ok" and r["width"] == 136 and r["resolution"] == 96
        assert set(h["status"].values()) == {"ok"} and len(h["seconds"]) == 4
        assert all(v > 0 for v in h["method_memory_bytes"].values() if v is not None)
        assert h["method_memory_bytes"]["dcae_jax tiled"] < h["method_memory_bytes"]["dcae_jax untiled"]
        errs = h["errors_vs_untiled"]
        # Sharded decode is exact (one device here: the same program); both tilings depart from it.
        assert errs["dcae_jax sharded"]["max_8bit"] < 1e-3
        assert errs["dcae_jax tiled"]["mean_8bit"] > 1e-3 and errs["diffusers tiled"]["mean_8bit"] > 1e-3
    md = (out / "results.md").read_text()
    assert "| hires tiny 136x96 float32 | dcae_jax sharded |" in md


def test_markdown_and_stdout(smoke):
    out, proc = smoke
    md = (out / "results.md").read_text()
    result = json.loads((out / "results.json").read_text())
    assert md.startswith("### Benchmark suite, scale `smoke`")
    assert "| row | kind | model |" in md and "|---|" in md
    assert result["machine"]["processor"] in md
    assert "bench.suite --scale smoke" in md
    for row in result["rows"]:
        assert f"| {row['name']} |" in md
    last = proc.stdout.strip().splitlines()[-1]
    assert "results.json" in last and "results.md" in last and str(out) in last and "performance.md" in last
    doc = (out / "performance.md").read_text()  # --docs: the block replaced, the prose around it kept
    assert doc.startswith("# Perf\n\nprose before\n") and doc.endswith("\n\nprose after\n")
    assert "OLD TABLE" not in doc and md.strip() in doc and doc.count("bench.suite scale=smoke") == 2


def test_bad_scale_is_one_line_exit_2(tmp_path):
    proc = _run("--scale", "huge", "--out", str(tmp_path), timeout=60)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "--scale" in proc.stderr


def test_the_accelerator_plan_covers_the_whole_grid_in_priority_order():
    """Issue 17's grid: three autoencoders x 512² / 1024² / 2048² x fp32 / bf16, the three phases' train steps,
    UViT, and high-res decode at 3840x2160, 2048² and 4096²; names are unique (rows are selected by name)."""
    rows = suite.plan("accelerator", gpu=True)
    assert len({r.name for r in rows}) == len(rows)
    grid = {(r.model, r.resolution, r.dtype) for r in rows if r.fn == "autoencoder" and not r.extra["torch_compile"]}
    for model in ("f32c32", "f64c128", "f128c512"):
        for res in (512, 1024, 2048):
            for dtype in ("float32", "bfloat16"):
                assert (f"dc-ae-{model}-in-1.0", res, dtype) in grid, (model, res, dtype)
    assert {r.extra["phase"] for r in rows if r.fn == "train_step"} == {1, 2, 3}
    assert {(r.resolution, r.extra["width"]) for r in rows if r.fn == "highres"} == {
        (2160, 3840),
        (2048, 2048),
        (4096, 4096),
    }
    # The drop order: issue 17's targets first (bf16 encode+decode vs diffusers eager and vs torch.compile).
    assert [r.name for r in rows][:3] == [
        "ae f32c32 512 bfloat16",
        "ae f32c32 512 bfloat16+torch.compile",
        "ae f64c128 512 bfloat16",
    ]
    assert not [r for r in suite.plan("accelerator", gpu=False) if r.extra.get("torch_compile")]


def test_docs_keep_one_block_per_machine(tmp_path):
    """A rerun replaces its own machine's block; another processor gets a block of its own beside it; a
    placeholder block (no machine) is replaced by the first real run."""
    doc = tmp_path / "perf.md"
    cpu, acc = suite.docs_markers("cpu"), suite.docs_markers("accelerator")
    doc.write_text(
        f"# Perf\n\n## CPU\n\n{cpu[0]}\n(not yet generated)\n{cpu[1]}\n\n"
        f"## Accelerator\n\n{acc[0]}\n(not yet generated)\n{acc[1]}\n\n## After\n"
    )
    suite.update_docs(str(doc), "cpu", "EPYC TABLE", machine="AMD EPYC (family 25 model 17)")
    suite.update_docs(str(doc), "cpu", "XEON TABLE", machine="Intel(R) Xeon(R) Processor (family 6 model 143)")
    suite.update_docs(str(doc), "cpu", "EPYC TABLE 2", machine="AMD EPYC (family 25 model 17)")
    suite.update_docs(str(doc), "accelerator", "H200 TABLE", machine="NVIDIA H200")
    text = doc.read_text()
    assert "EPYC TABLE 2" in text and "EPYC TABLE\n" not in text and "XEON TABLE" in text
    assert "(not yet generated)" not in text and "H200 TABLE" in text
    assert text.index("EPYC TABLE 2") < text.index("XEON TABLE") < text.index("## Accelerator"), text
    assert text.index("## Accelerator") < text.index("H200 TABLE") < text.index("## After"), text
    assert text.count("<!-- bench.suite scale=cpu") == 2 and text.count("<!-- /bench.suite scale=cpu") == 2


def test_machine_tag_names_the_processor_or_the_accelerator():
    mach = suite.machine()
    tag = suite.machine_tag(mach)
    assert mach["processor"] in tag
    if mach["processor_id"]:
        assert mach["processor_id"] in tag
    assert suite.machine_tag({**mach, "accelerator": "NVIDIA H200"}) == "NVIDIA H200"


def test_a_run_cut_short_keeps_its_finished_rows(tmp_path, monkeypatch):
    """results.json and results.md are rewritten after each row, marked incomplete until the end: a lease that
    ends or a killed job keeps what was measured."""
    calls = []

    def fake_child(specs, repeats, timeout, warmup=1):
        if calls:
            raise KeyboardInterrupt  # the job is killed during the second row
        calls.append(specs[0].name)
        row = suite._error_row(specs[0], "error", "measured nothing: a stand-in child")
        row["row_wall_s"] = 1.0
        return [row], ""

    monkeypatch.setattr(suite, "run_child", fake_child)
    with pytest.raises(KeyboardInterrupt):
        suite.main(["--scale", "cpu", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["complete"] is False and [r["name"] for r in result["rows"]] == calls
    assert "(incomplete" in (tmp_path / "results.md").read_text().splitlines()[0]
    assert not list(tmp_path.glob("*.tmp"))


def test_count_flops_matches_the_measured_rows(smoke):
    """bench.count_flops (abstract inputs, lowered for a platform, no device) counts what the suite's measuring
    functions count on that platform: here the smoke rows on the CPU, each row's own program."""
    from bench import count_flops

    out, _ = smoke
    measured = {r["name"]: r["flops"] for r in json.loads((out / "results.json").read_text())["rows"]}
    counted = {}
    for spec in suite.plan("smoke", gpu=False):
        counted.update(count_flops.count(spec, "cpu"))
    assert set(counted) == set(measured)
    for name, flops in counted.items():
        assert flops == pytest.approx(measured[name], rel=1e-6), name


def test_count_flops_command_lowers_for_another_platform(tmp_path):
    out = str(tmp_path / "f.json")
    proc = _run("--platform", "cuda", "--only", "ae tiny", "--scale", "smoke", "--out", out, module="bench.count_flops")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "f.json").read_text())
    assert result["platform"] == "cuda" and list(result["flops"]) == ["ae tiny 32 float32"]
    assert result["flops"]["ae tiny 32 float32"] > 0
    assert "wrote" in proc.stdout.strip().splitlines()[-1]
    bad = _run("--platform", "metal", module="bench.count_flops")
    assert bad.returncode == 2 and "--platform" in bad.stderr and "Traceback" not in bad.stderr


def test_count_flops_utilisation_table_of_a_run(smoke, capsys, tmp_path):
    """`--results`: a markdown row per measured row, with our FLOPs (the count above) and both sides' TFLOP/s."""
    from bench import count_flops

    out, _ = smoke
    rows = [r for r in json.loads((out / "results.json").read_text())["rows"] if r["status"] == "ok"]
    assert count_flops.main(["--platform", "cpu", "--results", str(out / "results.json")]) == 0
    table = capsys.readouterr().out
    for r in rows:
        line = next(x for x in table.splitlines() if x.startswith(f"| {r['name']} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert float(cells[3]) == pytest.approx(r["flops"] / 1e9, abs=0.6), r["name"]
        assert float(cells[4]) == pytest.approx(r["flops"] / r["seconds"]["dcae_jax"] / 1e12, abs=0.06)
    bad = tmp_path / "notes.json"
    bad.write_text("[1, 2]")
    assert count_flops.main(["--results", str(bad)]) == 2
    assert "not a bench.suite results.json" in capsys.readouterr().err


def test_accelerator_script_runs_its_preflight_and_the_suite(tmp_path):
    """bench/accelerator.sh (the one call on a lent GPU) on this CPU: machine record, the tiny preflight row, then the
    accelerator scale with a budget too small for any row (each recorded as skipped), every file where it says."""
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", "bench/accelerator.sh", str(out), "", "--budget", "1"],
        cwd=REPO,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    env = (out / "environment.txt").read_text()
    assert "cores:" in env and "used: jax" in env
    preflight = json.loads((out / "preflight" / "results.json").read_text())
    assert [r["status"] for r in preflight["rows"]] == ["ok"]
    result = json.loads((out / "accelerator" / "results.json").read_text())
    assert result["complete"] and result["scale"] == "accelerator" and "--budget" in result["command"]
    assert {r["status"] for r in result["rows"]} == {"skipped"}
    assert f"wrote {out}" in proc.stdout.strip().splitlines()[-1]
    shellcheck = pathlib.Path(sys.executable).parent / "shellcheck"
    if shellcheck.exists():
        lint = subprocess.run([str(shellcheck), "bench/accelerator.sh"], cwd=REPO, capture_output=True, text=True)
        assert lint.returncode == 0, lint.stdout


def test_uvit_steps_are_timed_back_to_back_with_one_wait(monkeypatch):
    """bench.diffusion._timed: `steps` calls per repeat, one wait at the end of each, seconds per call."""
    import jax.numpy as jnp

    from bench import diffusion

    calls, waits = [], []
    monkeypatch.setattr(diffusion.jax, "block_until_ready", lambda x: waits.append(len(calls)) or x)
    times = diffusion._timed(lambda: calls.append(1) or jnp.zeros(()), 2, steps=4)
    assert len(calls) == 8 and waits == [4, 8] and len(times) == 2 and all(t > 0 for t in times)
