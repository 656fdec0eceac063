"""`python -m bench.conv`: its --shapes parsing, and a tiny run of every pass (each checks ours and torch's result
against XLA's conv before timing, so a wrong kernel-gradient path fails here). Never timings."""

import pytest

from bench import conv
from dcae_jax.runtime import compute


def test_shapes_parse_and_bad_ones_name_the_item():
    assert conv.parse_shapes("8x64x16x16x3, 1x256x128x3x3") == ((8, 64, 16, 16, 3), (1, 256, 128, 3, 3))
    assert conv.parse_shapes("") == ()
    for bad in ("8x64x16x3", "8x64x16x16x0", "8x64xax16x3"):
        with pytest.raises(ValueError, match=bad):
            conv.parse_shapes(bad)


@pytest.mark.parametrize("which", conv.PASSES)
def test_every_pass_runs_on_both_kernel_gradient_paths(which, capsys, monkeypatch):
    monkeypatch.setenv(compute.CONV_KERNEL_GRAD_ENV, "dots")  # the default picks by processor vendor
    # 4 -> 4 channels: XLA's own kernel-gradient conv; 136 -> 128: the matmuls (layers.kernel_grad_as_dots).
    conv.main(["--pass", which, "--repeats", "1", "--shapes", "2x6x4x4x3,1x5x136x128x3,1x4x8x8x1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "ms" not in line]
    assert [r.split(" |")[0] for r in rows] == [
        "| 2 x 6² x 4 -> 4, 3x3",
        "| 1 x 5² x 136 -> 128, 3x3",
        "| 1 x 4² x 8 -> 8, 1x1",
    ]


def test_a_bad_shape_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        conv.main(["--shapes", "8x64"])
    assert exit_.value.code == 2 and "'8x64' is not batch x size" in capsys.readouterr().err
