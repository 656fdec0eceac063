"""A tiny DC-AE for a few steps on the bundled photos: multi-process CPU tests and the AOT tool's CI check.

    python -m dcae_jax.main --config=configs/tiny_test.py:steps=4,batch=8 --workdir=/tmp/tiny
    launch/local.sh -n 2 --cpu-devices 2 configs/tiny_test.py:steps=4,fsdp=2 /tmp/tiny_2proc
    python -m dcae_jax.aot --config=configs/tiny_test.py --topology=v5e-4

Args: phase (1 | 2 | 3), steps, batch (global), resolution, fsdp (size of the mesh's fsdp axis; the
data axis takes the remaining devices), checkpoint_every. Adam's eps is 1e-3 so that runs on
different device/process layouts agree to float noise (see tests/autoencoder/test_train.py, sharded test).
"""

from dcae_jax.training import config as common


def get_config(arg: str = ""):
    a = common.parse_arg(arg, phase=1, steps=4, batch=8, resolution=32, fsdp=1, checkpoint_every=2)
    c = common.base_config()
    common.apply_phase(c, a.phase, num_stages=4)
    c.resolution = c.eval_resolution = a.resolution
    c.global_batch_size, c.eval_batch_size = a.batch, 4
    c.num_steps = a.steps
    c.log_every, c.checkpoint_every, c.eval_every = 1, a.checkpoint_every, 0
    c.keep_checkpoints = 10
    c.eval_lpips = c.eval_rfid = False  # no perceptual networks in multi-process / AOT smoke runs
    c.optim.learning_rate, c.optim.eps = 1e-4, 1e-3
    c.disc.base_features, c.disc.num_layers = 16, 2
    c.mesh.shape = (-1, a.fsdp)
    c.sharding.min_size = 1  # shard every divisible leaf, so fsdp > 1 really splits the tiny model
    return c
