"""Mesh and parameter shardings from config data."""

import jax
import numpy as np
import pytest

from dcae_jax.runtime import sharding
from dcae_jax.training import config as common


def test_mesh_from_config_and_the_fsdp_axis_is_config_data():
    c = common.base_config()
    mesh = sharding.mesh_from_config(c)
    assert mesh.axis_names == ("data", "fsdp") and mesh.devices.size == jax.device_count()
    tree = {"w": jax.ShapeDtypeStruct((256, 128), np.float32)}
    assert sharding.config_shardings(tree, mesh, c)["w"].mesh == mesh
    # Renaming the axes without naming the FSDP axis must not silently turn FSDP off.
    c.mesh.axes = ("batch", "model")
    renamed = sharding.mesh_from_config(c)
    with pytest.raises(ValueError, match=r"no axis 'fsdp' \(axes \['batch', 'model'\]\).*config.sharding.fsdp_axis"):
        sharding.config_shardings(tree, renamed, c)
    c.sharding.fsdp_axis = "model"
    assert sharding.config_shardings(tree, renamed, c)["w"].mesh == renamed
    c.sharding.rules = [(".*", "replicate")]  # replicate-only rules need no FSDP axis
    c.sharding.fsdp_axis = "absent"
    assert sharding.config_shardings(tree, renamed, c)["w"].spec == jax.sharding.PartitionSpec()
