"""metrics.jsonl survives a resume (re-logged steps replace earlier lines, a torn last line is ignored); curves.png
has a panel per logged field that is not always zero."""

import json

from PIL import Image

from dcae_jax.metrics import history


def test_append_read_and_resume(tmp_path):
    for step in (1, 2, 3):
        history.append(tmp_path, step, {"loss": 1.0 / step, "gen_loss": 0.0})
    history.append(tmp_path, 3, {"loss": 0.25, "gen_loss": 0.0})  # step 3 again after a resume from step 2
    with open(tmp_path / history.FILENAME, "a") as f:
        f.write('{"step": 4, "loss"')  # killed mid-write
    rows = history.read(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["loss"] == 0.25
    assert json.loads((tmp_path / history.FILENAME).read_text().splitlines()[0]) == {
        "step": 1,
        "loss": 1.0,
        "gen_loss": 0.0,
    }


def test_plot_leaves_out_fields_that_are_always_zero(tmp_path):
    assert history.plot(tmp_path, ["loss"], "empty") is None
    for step in range(1, 30):
        history.append(tmp_path, step, {"loss": 10.0 / step, "gen_loss": 0.0, "grad_norm": 1.0 + step})
    out = history.plot(tmp_path, ["loss", "gen_loss", "grad_norm"], "test run")
    w, h = Image.open(out).size
    assert out == tmp_path / history.PLOT and h < w < 3 * h  # two panels side by side (gen_loss left out)
