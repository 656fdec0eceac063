"""`DCAE`: load any DC-AE checkpoint and encode/decode images, mirroring diffusers' `AutoencoderDC`.

    from dcae_jax import DCAE
    ae = DCAE.from_pretrained("mit-han-lab/dc-ae-f64c128-in-1.0-diffusers")   # or a local dir
    z = ae.encode(images)            # NHWC float in [-1, 1] -> NHWC latents
    x = ae.decode(z)                 # -> NHWC images (not clamped)
    z_diffusion = z * ae.config.scaling_factor   # the caller applies the scaling factor

Accepted sources (detected from files and keys): a diffusers directory (`config.json` +
`diffusion_pytorch_model.safetensors`), an efficientvit directory or file (`model.safetensors`, or
a `.pt/.pth` state dict, read with torch only when torch is installed), our export
(`dcae_config.json` + orbax `variables/`), or a Hugging Face repo id (downloaded with
huggingface_hub when online).
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dcae_jax.autoencoder import convert
from dcae_jax.autoencoder.model import (
    VARIANTS,
    DCAEConfig,
    DCAEModel,
    canonical_name,
    check_latent_channels,
    count_params,
    get_config,
)
from dcae_jax.runtime import distributed, paths, state_dict

SAVE_FORMATS = ("dcae_jax", "diffusers", "efficientvit")
EXPORT_CONFIG = "dcae_config.json"
EXPORT_VARIABLES = "variables"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


def _registry_name_hint(text: str | None) -> str | None:
    """A released variant name contained in a path or repo id, if any (longest match wins)."""
    if not text:
        return None
    return canonical_name(text)


def _read_json(path: pathlib.Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: invalid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


def _find_efficientvit_weights(d: pathlib.Path) -> pathlib.Path:
    for name in ("model.safetensors", "model.pt", "model.pth", "pytorch_model.bin"):
        if (d / name).exists():
            return d / name
    cands = sorted(d.glob("*.safetensors")) + sorted(d.glob("*.pt")) + sorted(d.glob("*.pth"))
    if len(cands) == 1:
        return cands[0]
    hint = ""
    if (d / "diffusion_config.json").is_file():  # dcae_jax.diffusion.pipeline.CONFIG_FILE
        hint = f"; this is a diffusion model's export, its autoencoder is in {d / 'autoencoder'} when bundled"
    raise FileNotFoundError(
        f"{d}: no DC-AE weights found; expected {DIFFUSERS_WEIGHTS} + config.json (diffusers), "
        f"model.safetensors or model.pt (efficientvit), or {EXPORT_CONFIG} + {EXPORT_VARIABLES}/ (dcae_jax export)"
        f"{hint}"
    )


def _resolve(path_or_repo_id: str | os.PathLike) -> paths.Path:
    s = str(path_or_repo_id)
    if paths.is_remote(s):  # gs://: our export is read in place (orbax); other formats through a local copy
        p = paths.path(s)
        if not p.exists():
            raise FileNotFoundError(f"{s}: no such file or folder")
        return p if p.is_dir() and (p / EXPORT_CONFIG).exists() else paths.path(paths.local_copy(p))
    p = paths.path(s)
    if p.exists():
        return p
    if s.count("/") != 1 or s.startswith((".", "/")):
        from dcae_jax.autoencoder.model import REPO_IDS

        name = canonical_name(s)
        hint = f"; for the released model use its repo id, {REPO_IDS[name]}" if name in REPO_IDS else ""
        raise FileNotFoundError(f"{s}: no such file or directory (and not a Hugging Face repo id 'owner/name'){hint}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:
        raise FileNotFoundError(f"{s} is not a local path and huggingface_hub is not installed") from err
    try:
        return pathlib.Path(snapshot_download(s, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as err:  # offline, missing repo, auth
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise FileNotFoundError(
            f"{s}: not a local path, and downloading it from the Hugging Face hub failed ({type(err).__name__}: "
            f"{reason}). "
            "Download it on a machine that is online (hf download REPO --local-dir DIR) "
            "and pass the directory."
        ) from err


class _Found(NamedTuple):
    config: DCAEConfig
    fmt: str  # "export", "diffusers" or an efficientvit key format
    path: pathlib.Path  # the export directory or the weights file
    state: Any  # the (lazy) state dict; None for an export


def _locate(path_or_repo_id: str | os.PathLike, variant: str | None) -> _Found:
    """What a checkpoint is: its format, architecture and weights file. Reads configs and key names only (a
    safetensors file is read lazily; a .pt state dict is loaded)."""
    root = _resolve(path_or_repo_id)
    hint = variant or _registry_name_hint(str(path_or_repo_id))
    if root.is_dir() and (root / EXPORT_CONFIG).exists():
        return _Found(DCAEConfig.from_dict(_read_json(root / EXPORT_CONFIG)), "export", root, None)
    if root.is_dir() and (root / DIFFUSERS_WEIGHTS).exists():
        cfg_path = root / "config.json"
        if not cfg_path.exists():
            raise FileNotFoundError(f"{root}: diffusers weights without config.json")
        raw = _read_json(cfg_path)
        name = hint or _registry_name_hint(raw.get("_name_or_path")) or "custom"
        try:
            config = DCAEConfig.from_diffusers(raw, name=name)
        except (KeyError, TypeError, ValueError) as err:
            msg = f"missing field {err.args[0]!r}" if isinstance(err, KeyError) else str(err)
            raise ValueError(f"{cfg_path}: not a usable AutoencoderDC config ({msg})") from None
        return _Found(config, "diffusers", root / DIFFUSERS_WEIGHTS, state_dict.read(root / DIFFUSERS_WEIGHTS))
    weights = root if root.is_file() else _find_efficientvit_weights(root)
    raw = {}
    if root.is_dir() and (root / "config.json").exists():
        raw = _read_json(root / "config.json")
        hint = hint or _registry_name_hint(raw.get("model_name"))
    state = convert.strip_wrappers(state_dict.read(weights))
    fmt = convert.detect_format(state.keys())
    candidates = convert.match_registry(set(state), fmt)
    if hint is not None:
        config = get_config(hint)
        if candidates and hint not in candidates:
            raise ValueError(f"{weights}: keys match {candidates}, not the requested variant {hint!r}")
    elif candidates:
        config = VARIANTS[candidates[0]]
        if len({VARIANTS[c].scaling_factor for c in candidates}) > 1:
            warnings.warn(
                f"{weights}: the architecture matches {candidates}, which differ only in scaling_factor; "
                f"pass variant=... to choose. Loaded as {candidates[0]!r} with scaling_factor=None.",
                stacklevel=3,
            )
            config = config.replace(scaling_factor=None, name=candidates[0].replace("-in-", "-in|mix-"))
    else:
        raise ValueError(
            f"{weights}: the keys match none of the released DC-AE variants {sorted(VARIANTS)}; "
            "a custom architecture needs a config (diffusers config.json or a dcae_jax export)"
        )
    if "scaling_factor" in raw:  # written by `save_pretrained(format="efficientvit")`: the model's own factor
        config = config.replace(scaling_factor=raw["scaling_factor"])
    return _Found(config, fmt, weights, state)


def released_architecture(config: DCAEConfig) -> str | None:
    """The released model whose architecture `config` has (name and scaling factor aside), if any."""
    if config.name in VARIANTS and config.replace(scaling_factor=None) == VARIANTS[config.name].replace(
        scaling_factor=None
    ):
        return config.name
    for name, c in VARIANTS.items():
        if config.replace(name=name, scaling_factor=None) == c.replace(scaling_factor=None):
            return name
    return None


def load_config(path_or_repo_id: str | os.PathLike, variant: str | None = None) -> DCAEConfig:
    """The architecture of a checkpoint in any format `DCAE.from_pretrained` takes, without converting its weights."""
    return _locate(path_or_repo_id, variant).config


class DCAE:
    """A DC-AE with its weights: jitted, batched encode/decode on NHWC float images in [-1, 1]."""

    def __init__(self, config: DCAEConfig, variables: dict[str, Any], dtype: Any = jnp.float32):
        self.config = config
        self.dtype = jnp.dtype(dtype)
        if self.dtype != jnp.float32:
            variables = jax.tree_util.tree_map(lambda a: jnp.asarray(a, self.dtype), variables)
        else:
            variables = jax.tree_util.tree_map(jnp.asarray, variables)
        self.variables = variables
        self.model = DCAEModel(config, dtype=self.dtype, param_dtype=self.dtype)

    # ------------------------------------------------------------------------------------------
    # Loading and saving.

    @classmethod
    def from_pretrained(
        cls, path_or_repo_id: str | os.PathLike, variant: str | None = None, dtype: Any = jnp.float32
    ) -> DCAE:
        """Loads a checkpoint in any supported format (see module docstring)."""
        found = _locate(path_or_repo_id, variant)
        if found.fmt == "export":
            return cls._load_export(found.path, dtype)
        return cls._from_state(found.config, found.state, found.fmt, found.path, dtype)

    @classmethod
    def _from_state(cls, config: DCAEConfig, state, fmt: str, source, dtype) -> DCAE:
        shapes = _variable_shapes(config)
        try:
            variables = convert.convert_state_dict(state, config, fmt, expected_shapes=shapes)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None
        return cls(config, variables, dtype)

    @classmethod
    def _load_export(cls, root: pathlib.Path, dtype) -> DCAE:
        import orbax.checkpoint as ocp

        config = DCAEConfig.from_dict(_read_json(root / EXPORT_CONFIG))
        shapes = _variable_shapes(config)
        target: dict[str, Any] = {}
        for full, shape in shapes.items():
            node = target
            for p in full[:-1]:
                node = node.setdefault(p, {})
            node[full[-1]] = jax.ShapeDtypeStruct(shape, jnp.float32)
        from dcae_jax.training import checkpoints

        with checkpoints.reading(f"{root}: the export's {EXPORT_VARIABLES}/"), ocp.StandardCheckpointer() as ckptr:
            variables = ckptr.restore(paths.path(root) / EXPORT_VARIABLES, target)
        _check_variables(variables, shapes, root)
        return cls(config, variables, dtype)

    def save_pretrained(self, out: str | os.PathLike, format: str = "dcae_jax") -> paths.Path:
        """Writes the model (fp32) in one of `SAVE_FORMATS`:

        - "dcae_jax" (default): `dcae_config.json` + an orbax checkpoint of the variables;
        - "diffusers": `config.json` + `diffusion_pytorch_model.safetensors`, for `AutoencoderDC.from_pretrained`;
        - "efficientvit": `model.safetensors` in the original (efficientvit / DC-Gen) key layout + a `config.json`
          naming the released architecture it has (that format has no config of its own, so only released
          architectures can be written in it).

        Multi-process jobs call it on every process (orbax saves collectively); process 0 writes the files.
        A model a format cannot express (e.g. `residual=False`) raises ValueError before anything is written.
        """
        if format not in SAVE_FORMATS:
            raise ValueError(f"format={format!r}; valid: {', '.join(SAVE_FORMATS)}")
        if format != "dcae_jax":
            return self._save_torch_format(paths.path(out, "out"), format)
        import orbax.checkpoint as ocp

        out = paths.path(out, "out")
        out.mkdir(parents=True, exist_ok=True)
        # An empty collection (a model without BatchNorm has no batch_stats) is not written: the loader expects
        # exactly the collections the architecture has.
        variables = {
            k: jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), v)
            for k, v in self.variables.items()
            if jax.tree_util.tree_leaves(v)
        }
        with ocp.StandardCheckpointer() as ckptr:  # multi-process: every process calls this, process 0 writes
            ckptr.save(out / EXPORT_VARIABLES, variables, force=True)
            ckptr.wait_until_finished()
        if jax.process_index() == 0:
            # Last and atomic: a partial export has no config and is not loadable.
            paths.write_text_atomic(out / EXPORT_CONFIG, self.config.to_json())
        distributed.barrier(f"save_pretrained {out}")  # nobody reads the export before the config is there
        return out

    def _save_torch_format(self, out: paths.Path, fmt: str) -> paths.Path:
        from safetensors.numpy import save_file

        if fmt == "diffusers":
            files = {"config.json": {"_class_name": "AutoencoderDC", **self.config.to_diffusers()}}
            weights = DIFFUSERS_WEIGHTS
        else:
            name = released_architecture(self.config)
            if name is None:
                raise ValueError(
                    f"{self.config.name}: the efficientvit format has no config of its own, so only a released "
                    f"architecture ({', '.join(sorted(VARIANTS))}) can be written in it; use format='diffusers'"
                )
            files = {"config.json": {"model_name": name, "scaling_factor": self.config.scaling_factor}}
            weights = "model.safetensors"
        tensors = convert.to_state_dict(jax.device_get(self.variables), self.config, fmt)  # raises if inexpressible
        if jax.process_index() == 0:
            out.mkdir(parents=True, exist_ok=True)
            with paths.writing(out / weights) as local:
                save_file(tensors, local, metadata={"format": "pt"})
            for filename, content in files.items():  # the config last: a partial export is not loadable
                paths.write_text_atomic(out / filename, json.dumps(content, indent=2))
        distributed.barrier(f"save_pretrained {out}")
        return out

    # ------------------------------------------------------------------------------------------
    # Inference.

    def num_params(self) -> int:
        return count_params(self.variables["params"])

    @functools.cached_property
    def _encode_fn(self):
        return jax.jit(lambda v, x: self.model.apply(v, x, method=DCAEModel.encode))

    @functools.cached_property
    def _decode_fn(self):
        return jax.jit(lambda v, z: self.model.apply(v, z, method=DCAEModel.decode))

    def _check_images(self, images) -> jax.Array:
        x = jnp.asarray(images)
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[-1] != self.config.in_channels:
            raise ValueError(
                f"expected NHWC images with {self.config.in_channels} channels, got shape {tuple(x.shape)}"
            )
        return x.astype(self.dtype)

    def encode(self, images, latent_channels: int | None = None) -> jax.Array:
        """(B, H, W, 3) in [-1, 1] -> (B, ceil(H/f), ceil(W/f), latent_channels).

        H and W that are not multiples of the compression factor f are edge-padded first. `latent_channels=c`
        keeps the first c channels of a structured latent (DC-AE 1.5); `decode` takes such a prefix back.
        """
        if latent_channels is not None:
            check_latent_channels(self.config, latent_channels)
        x = self._check_images(images)
        f = self.config.spatial_compression_ratio
        ph, pw = -x.shape[1] % f, -x.shape[2] % f
        if ph or pw:
            x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
        z = self._encode_fn(self.variables, x)
        return z if latent_channels is None else z[..., :latent_channels]

    def decode(self, latents) -> jax.Array:
        """(B, h, w, c) -> (B, h*f, w*f, 3); values are not clamped. c: all latent channels, or (a DC-AE 1.5 model)
        any prefix of them, the rest taken as zeros."""
        z = jnp.asarray(latents)
        if z.ndim != 4 or not 1 <= z.shape[-1] <= self.config.latent_channels:
            raise ValueError(
                f"expected NHWC latents with {self.config.latent_channels} channels, got shape {tuple(z.shape)}"
            )
        check_latent_channels(self.config, z.shape[-1])
        return self._decode_fn(self.variables, z.astype(self.dtype))

    def reconstruct(self, images) -> jax.Array:
        """decode(encode(x)) cropped back to the input size (any H, W)."""
        x = self._check_images(images)
        return self.decode(self.encode(x))[:, : x.shape[1], : x.shape[2]]


@functools.lru_cache(maxsize=16)
def _variable_shapes_cached(config: DCAEConfig) -> tuple[tuple[tuple[str, ...], tuple[int, ...]], ...]:
    res = config.spatial_compression_ratio
    abstract = jax.eval_shape(
        DCAEModel(config).init, jax.random.key(0), jax.ShapeDtypeStruct((1, res, res, config.in_channels), jnp.float32)
    )
    flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
    return tuple((tuple(k.key for k in path), tuple(leaf.shape)) for path, leaf in flat)


def _check_variables(variables: Any, shapes: dict[tuple[str, ...], tuple[int, ...]], where: Any) -> None:
    """Every variable has the config's shape and finite values; one ValueError lists the problems."""
    from flax import traverse_util

    flat = traverse_util.flatten_dict(variables)
    problems = [
        f"{'/'.join(k)}: shape {tuple(np.shape(flat[k]))}, the config ({EXPORT_CONFIG}) needs {shape}"
        for k, shape in shapes.items()
        if k in flat and tuple(np.shape(flat[k])) != tuple(shape)
    ]
    problems += [f"{'/'.join(k)}: missing" for k in shapes if k not in flat]
    if not problems:
        finite = jax.jit(lambda t: [jnp.all(jnp.isfinite(x)) for x in t])(list(flat.values()))
        problems += [f"{'/'.join(k)}: non-finite values" for k, ok in zip(flat, finite, strict=True) if not bool(ok)]
    if problems:
        raise ValueError(f"{where}: the export does not match its config:\n  " + "\n  ".join(problems[:20]))


def _variable_shapes(config: DCAEConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """(collection, *path) -> shape of every variable of `DCAEModel(config)`, without allocating."""
    return dict(_variable_shapes_cached(config))
