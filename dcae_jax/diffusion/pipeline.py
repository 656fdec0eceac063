"""`DCAEDiffusion`: a class-conditional latent diffusion model with its DC-AE, and guided sampling.

    pipe = DCAEDiffusion.from_pretrained("/path/to/workdir/export")
    images = pipe.generate([279, 388], guidance_scale=1.5, seed=0)   # (2, R, R, 3), about [-1, 1], not clipped

The export is a folder with `diffusion_config.json` (UViT config, objective, latent scaling factor,
sampler settings, the autoencoder's path or repo id) and an orbax checkpoint of the parameters.
Sampling follows the reference: noise -> guided solver (DPM-Solver++ for UViT's epsilon objective,
an ODE solver for USiT's velocity objective, 250-step DDPM for DiT; null class `num_classes`) ->
latents / scaling_factor -> DC-AE decode. `from_pretrained` also loads the released DC-AE diffusion
checkpoints (`dcae_jax.diffusion.released`).
Batches are split over this process's devices.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from dcae_jax.diffusion import gaussian_diffusion, objectives, samplers
from dcae_jax.diffusion.dit import DiT, DiTConfig, init_dit_params
from dcae_jax.diffusion.uvit import UViT, UViTConfig, init_uvit_params
from dcae_jax.runtime import distributed, paths, sharding

CONFIG_FILE = "diffusion_config.json"
PARAMS_DIR = "params"
FORMAT = "dcae_jax.diffusion/1"

# The reference's evaluation samplers: DPM-Solver++ (3rd order, 30 NFE) for UViT, adaptive Dopri5 for USiT,
# 250-step ancestral DDPM with the learned variance for DiT ("dit": GaussianDiffusion, epsilon + variance).
SAMPLER_DEFAULTS: dict[str, dict[str, Any]] = {
    "epsilon": {"name": "dpm_solver_pp", "steps": 30, "order": 3, "method": "singlestep", "guidance_scale": 1.5},
    "velocity": {"name": "dopri5", "steps": 250, "atol": 1e-6, "rtol": 1e-3, "guidance_scale": 1.2},
    "dit": {"name": "ddpm", "steps": 250, "guidance_scale": 1.3},
}
VALID_SAMPLERS = {"epsilon": ("dpm_solver_pp",), "velocity": ("euler", "heun", "dopri5"), "dit": ("ddpm",)}
MODEL_TYPES = {"uvit": (UViTConfig, UViT, init_uvit_params), "dit": (DiTConfig, DiT, init_dit_params)}


def sampler_settings(objective: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The objective's default sampler with `overrides`; unknown names raise with the valid ones."""
    if objective not in SAMPLER_DEFAULTS:
        raise KeyError(f"objective {objective!r}; valid: {sorted(SAMPLER_DEFAULTS)}")
    s = {**SAMPLER_DEFAULTS[objective], **{k: v for k, v in (overrides or {}).items() if v is not None}}
    valid = VALID_SAMPLERS[objective]
    if s["name"] not in valid:
        known = s["name"] in {n for names in VALID_SAMPLERS.values() for n in names}
        what = f"does not fit the {objective!r} objective" if known else "is not a sampler"
        raise KeyError(f"sampler {s['name']!r} {what}; valid for this model: {list(valid)}")
    if isinstance(s["steps"], bool) or not (isinstance(s["steps"], int | np.integer) and s["steps"] >= 1):
        raise ValueError(f"sampler steps must be an integer >= 1, got {s['steps']!r}")
    if not np.isfinite(float(s["guidance_scale"])):
        raise ValueError(f"guidance_scale must be a finite number, got {s['guidance_scale']!r}")
    if "order" in s and s["order"] not in (1, 2, 3):
        raise ValueError(f"sampler order must be 1, 2 or 3, got {s['order']!r}")
    for tol in ("atol", "rtol"):
        if tol in s and not float(s[tol]) > 0:
            raise ValueError(f"sampler {tol} must be > 0, got {s[tol]!r}")
    return s


def _model_type(config: Any) -> str:
    for name, (cls, _, _) in MODEL_TYPES.items():
        if isinstance(config, cls):
            return name
    raise TypeError(f"config must be one of {[c.__name__ for c, _, _ in MODEL_TYPES.values()]}, got {type(config)}")


def make_sample_fn(model: UViT | DiT, objective: str, settings: dict[str, Any]) -> Callable:
    """(params, noise (B, H, W, C), labels (B,), rng) -> latents (B, H, W, C); jit it (settings are static).

    `rng` feeds the stochastic sampler (DDPM); the ODE samplers ignore it.
    """
    null_class = model.config.null_class
    scale = float(settings["guidance_scale"])

    def sample(params, noise, labels, rng):
        def apply_fn(x, t, y):  # the solvers pass a scalar (or per-example) time
            t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
            return model.apply({"params": params}, x, t, y)

        if objective == "dit":
            guided = gaussian_diffusion.dit_classifier_free_guidance(
                apply_fn, labels, null_class=null_class, scale=scale, guided_channels=model.config.in_channels
            )
            return gaussian_diffusion.ddpm_sample(guided, noise, rng, num_steps=int(settings["steps"]))
        guided = samplers.classifier_free_guidance(apply_fn, labels, null_class=null_class, scale=scale)
        if objective == "epsilon":
            schedule = samplers.NoiseScheduleVP(objectives.scaled_linear_betas())
            return samplers.dpm_solver_pp(
                guided,
                noise,
                schedule=schedule,
                steps=int(settings["steps"]),
                order=int(settings.get("order", 3)),
                method=settings.get("method", "singlestep"),
            )
        x1, _ = samplers.ode_sample(
            guided,
            noise,
            method=settings["name"],
            num_steps=int(settings["steps"]),
            atol=float(settings.get("atol", 1e-6)),
            rtol=float(settings.get("rtol", 1e-3)),
        )
        return x1

    return sample


def _local_mesh() -> Mesh:
    return sharding.make_mesh([-1], ["batch"], devices=jax.local_devices())


class DCAEDiffusion:
    """A UViT (epsilon or velocity objective) or DiT on DC-AE latents, with its sampler and autoencoder."""

    def __init__(
        self,
        config: UViTConfig | DiTConfig,
        params: Any,
        *,
        objective: str = "epsilon",
        scaling_factor: float = 1.0,
        sampler: dict[str, Any] | None = None,
        autoencoder: Any = "",
        classes: list[int] | None = None,
        dtype: Any = jnp.float32,
        mesh: Mesh | None = None,
    ):
        """`mesh`: the devices sampling runs on, the batch split over all its axes: by default this process's
        devices; a trainer passes its mesh (its processes then call `generate_latents` together) and the
        parameters as they are sharded over it, so that none are gathered while the training state lives."""
        self.config = config
        self.mesh = mesh
        # The class ids the model was trained on (a subset of its label table when some classes had no examples);
        # sampling draws from these by default.
        self.classes = list(range(config.num_classes)) if classes is None else [int(c) for c in classes]
        if any(not 0 <= c < config.num_classes for c in self.classes) or not self.classes:
            raise ValueError(f"classes {self.classes} must be non-empty ids in [0, {config.num_classes})")
        self.objective = objective
        self.scaling_factor = float(scaling_factor)
        self.sampler = sampler_settings(objective, sampler)
        self.params = jax.tree_util.tree_map(jnp.asarray, params)
        self.model_type = _model_type(config)
        self.model = MODEL_TYPES[self.model_type][1](config, dtype=dtype)
        self._autoencoder = autoencoder  # a path / repo id (loaded on first use, kept for the export) or a DCAE
        self._loaded_autoencoder = None if isinstance(autoencoder, str | os.PathLike) else autoencoder

    # ------------------------------------------------------------------------------------------
    # Loading and saving.

    @classmethod
    def from_pretrained(
        cls, path_or_repo_id: str | os.PathLike, autoencoder: Any = None, dtype: Any = jnp.float32
    ) -> DCAEDiffusion:
        """Our export, or a released DC-AE diffusion checkpoint (a local folder or a Hugging Face repo id
        such as `mit-han-lab/dc-ae-f64c128-in-1.0-uvit-h-in-512px`; see `dcae_jax.diffusion.released`).
        `autoencoder` (a path, repo id or DCAE) overrides the one the checkpoint names or bundles."""
        import orbax.checkpoint as ocp

        root = paths.path(path_or_repo_id)
        if not (root / CONFIG_FILE).exists():
            from dcae_jax.diffusion import released

            return released.load(path_or_repo_id, autoencoder=autoencoder, dtype=dtype)
        cfg_path = root / CONFIG_FILE
        raw = json.loads(cfg_path.read_text())
        if raw.get("format") != FORMAT:
            raise ValueError(f"{cfg_path}: format {raw.get('format')!r}, expected {FORMAT!r}")
        model_type = raw.get("model_type", "uvit")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"{cfg_path}: model_type {model_type!r}; valid: {sorted(MODEL_TYPES)}")
        config_cls, _, init_fn = MODEL_TYPES[model_type]
        fields = {f.name for f in dataclasses.fields(config_cls)}
        unknown = set(raw["model"]) - fields
        if unknown:
            raise ValueError(f"{cfg_path}: unknown {config_cls.__name__} fields {sorted(unknown)}")
        config = config_cls(**raw["model"])
        target = jax.eval_shape(lambda key: init_fn(config, key), jax.random.key(0))
        from dcae_jax.training import checkpoints

        with checkpoints.reading(f"{root}: the export's {PARAMS_DIR}/"), ocp.StandardCheckpointer() as ckptr:
            params = ckptr.restore(root / PARAMS_DIR, target)
        return cls(
            config,
            params,
            objective=raw["objective"],
            scaling_factor=raw["scaling_factor"],
            sampler=raw.get("sampler"),
            autoencoder=autoencoder if autoencoder is not None else _autoencoder_path(root, raw.get("autoencoder", "")),
            classes=raw.get("classes"),
            dtype=dtype,
        )

    def save_pretrained(self, out: str | os.PathLike, bundle_autoencoder: bool = False) -> paths.Path:
        """Writes the export (every process calls it: orbax saves collectively; process 0 writes the config).

        `bundle_autoencoder`: when the autoencoder is a local folder, copy it to `<out>/autoencoder/` and refer to it
        relatively, so that the export keeps working when moved (else the config names the path or repo id).
        """
        import orbax.checkpoint as ocp

        out = paths.path(out, "out")
        out.mkdir(parents=True, exist_ok=True)
        params = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), self.params)
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(out / PARAMS_DIR, params, force=True)
            ckptr.wait_until_finished()
        if jax.process_index() == 0:
            ae = str(self._autoencoder) if isinstance(self._autoencoder, str | os.PathLike) else ""
            if bundle_autoencoder and ae and paths.path(ae).is_dir():
                ae = _bundle(paths.path(ae), out)
            raw = {
                "format": FORMAT,
                "model_type": self.model_type,
                "model": dataclasses.asdict(self.config),
                "objective": self.objective,
                "scaling_factor": self.scaling_factor,
                "sampler": self.sampler,
                "autoencoder": ae,
                "classes": self.classes,
            }
            paths.write_text_atomic(out / CONFIG_FILE, json.dumps(raw, indent=2))  # last: no config, no export
        distributed.barrier(f"DCAEDiffusion.save_pretrained {out}")
        return out

    @property
    def autoencoder(self):
        """The DC-AE that decodes the latents (loaded on first use)."""
        if not self._autoencoder:
            raise ValueError("this diffusion model names no autoencoder: pass autoencoder=... to from_pretrained")
        if self._loaded_autoencoder is None:
            from dcae_jax.autoencoder.pretrained import DCAE

            ae = DCAE.from_pretrained(self._autoencoder)
            check_autoencoder_fits(ae.config, self.config.in_channels, self._autoencoder, "this diffusion model")
            self._loaded_autoencoder = ae
        return self._loaded_autoencoder

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        c = self.config
        return (c.input_size, c.input_size, c.in_channels)

    # ------------------------------------------------------------------------------------------
    # Sampling.

    @functools.lru_cache(maxsize=8)  # noqa: B019 -- one compiled sampler per setting; pipelines are few
    def _sample_fn(self, settings_json: str, mesh: Mesh):
        fn = make_sample_fn(self.model, self.objective, json.loads(settings_json))
        data, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)

        def sample(params, noise, labels, key_data):  # the key as raw data: a multi-process input is a jax.Array
            return fn(params, noise, labels, jax.random.wrap_key_data(key_data))

        return jax.jit(sample, in_shardings=(None, data, data, replicated), out_shardings=data)

    def sample_shape(self, latent_channels: int | None = None) -> tuple[int, int, int]:
        """(H, W, C) of the samples: all channels, or the first `latent_channels` of a model with adaptive
        channels (the USiT of DC-AE 1.5); anything else raises naming the valid range."""
        h, w, c = self.latent_shape
        if latent_channels is None or latent_channels == c:
            return (h, w, c)
        if not getattr(self.config, "adaptive_channels", False):
            raise ValueError(
                f"latent_channels={latent_channels}: this model has no adaptive channels, it samples all {c}"
            )
        if not 1 <= latent_channels <= c:
            raise ValueError(f"latent_channels={latent_channels}: expected 1..{c}")
        return (h, w, int(latent_channels))

    def noise(self, seed: int, n: int, chunk: int = 0, latent_channels: int | None = None) -> jax.Array:
        """The initial noise of `n` samples: a function of (seed, chunk) only, so runs are resumable."""
        key = jax.random.fold_in(jax.random.key(seed), chunk)
        return jax.random.normal(key, (n, *self.sample_shape(latent_channels)), jnp.float32)

    @staticmethod
    def sampler_key(seed: int, chunk: int = 0) -> jax.Array:
        """The stochastic sampler's key (DDPM's per-step noise), also a function of (seed, chunk) only."""
        return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), chunk), 1 << 30)

    def generate_latents(
        self,
        class_ids: Sequence[int],
        *,
        guidance_scale: float | None = None,
        seed: int = 0,
        chunk: int = 0,
        latent_channels: int | None = None,
        **sampler_overrides: Any,
    ) -> np.ndarray:
        """Scaled latents (N, H, W, C) for `class_ids`; the batch is padded to the mesh's device count (this
        process's devices unless the pipeline has a mesh; then every process calls this and gets all N).
        `latent_channels`: sample only the first C channels (a model with adaptive channels; the autoencoder
        decodes the prefix)."""
        ids = np.asarray(class_ids, np.int32).reshape(-1)
        if ids.size == 0:
            raise ValueError("class_ids is empty")
        if ids.min() < 0 or ids.max() > self.config.null_class:
            raise ValueError(f"class ids must be in [0, {self.config.null_class}] (the last one is the null class)")
        settings = sampler_settings(
            self.objective, {**self.sampler, "guidance_scale": guidance_scale, **sampler_overrides}
        )
        mesh = self.mesh or _local_mesh()
        n, d = ids.size, mesh.devices.size
        padded = -(-n // d) * d
        noise = np.asarray(self.noise(seed, n, chunk, latent_channels))
        if padded != n:
            noise = np.concatenate([noise, np.zeros((padded - n, *noise.shape[1:]), noise.dtype)])
            ids = np.concatenate([ids, np.full((padded - n,), self.config.null_class, np.int32)])
        key_data = np.asarray(jax.random.key_data(self.sampler_key(seed, chunk)))
        batch, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
        inputs = [  # every process holds the whole (small) arrays and places its own shards
            jax.make_array_from_callback(x.shape, s, lambda index, x=x: x[index])
            for x, s in ((noise, batch), (ids, batch), (key_data, replicated))
        ]
        fn = self._sample_fn(json.dumps(settings, sort_keys=True), mesh)
        return distributed.host_array(fn(self.params, *inputs))[:n]

    def decode(self, latents: Any) -> np.ndarray:
        """Scaled latents -> images (N, R, R, 3), about [-1, 1] and not clipped (`data.images.to_uint8` clips as the
        reference quantises), as the reference: latents / scaling_factor."""
        return np.asarray(self.autoencoder.decode(jnp.asarray(latents) / self.scaling_factor))

    def generate(
        self,
        class_ids: Sequence[int],
        guidance_scale: float | None = None,
        seed: int = 0,
        latent_channels: int | None = None,
        **sampler_overrides: Any,
    ) -> np.ndarray:
        """Class-conditional images (N, R, R, 3), about [-1, 1], not clipped (`latent_channels`: see
        `generate_latents`)."""
        return self.decode(
            self.generate_latents(
                class_ids,
                guidance_scale=guidance_scale,
                seed=seed,
                latent_channels=latent_channels,
                **sampler_overrides,
            )
        )


def check_autoencoder_fits(ae_config: Any, latent_channels: int, autoencoder: Any, what: str) -> None:
    """Raises, naming both, unless the autoencoder (its `DCAEConfig`) decodes `what`'s `latent_channels`-channel
    latents: all its channels, or a prefix of a DC-AE 1.5 structured latent."""
    from dcae_jax.autoencoder.model import check_latent_channels

    try:
        check_latent_channels(ae_config, latent_channels)
    except ValueError as err:
        raise ValueError(
            f"{what} has {latent_channels}-channel latents; the autoencoder {autoencoder} "
            f"({ae_config.latent_channels} channels) does not decode them ({err})"
        ) from None


def image_grid(images: np.ndarray, columns: int) -> np.ndarray:
    """(N, H, W, 3) -> one (rows*H, columns*W, 3) image; missing cells are black (-1)."""
    n, h, w, c = images.shape
    rows = -(-n // columns)
    full = np.full((rows * columns, h, w, c), -1.0, np.float32)
    full[:n] = images
    return full.reshape(rows, columns, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, columns * w, c)


BUNDLED_AUTOENCODER = "autoencoder"


def _bundle(ae: paths.Path, out: paths.Path) -> str:
    """Copies the autoencoder folder `ae` into `out/autoencoder`, replacing an older copy (its config is copied
    last, so an interrupted copy is refused by the loader rather than half-read)."""
    target = out / BUNDLED_AUTOENCODER
    if str(ae).rstrip("/") == str(target).rstrip("/"):
        return BUNDLED_AUTOENCODER
    paths.rmtree(target)
    paths.copytree(ae, target)
    return BUNDLED_AUTOENCODER


def _autoencoder_path(root: paths.Path, ae: str) -> str:
    """A relative autoencoder path in an export's config is relative to the export folder."""
    if ae and not paths.is_remote(ae) and not ae.startswith("/") and (root / ae).is_dir():
        return str(root / ae)
    return ae


def sample_grid(pipe: DCAEDiffusion, path: str | os.PathLike, *, seed: int = 0, n: int = 16) -> None:
    """`n` samples cycling over the classes the model was trained on (`pipe.classes`), as a PNG grid. Every
    process calls it (a pipeline with a multi-process mesh samples collectively); process 0 decodes and writes."""
    from dcae_jax.data import images as image_io

    ids = np.asarray(pipe.classes)[np.arange(n) % len(pipe.classes)]
    latents = pipe.generate_latents(ids, seed=seed)
    pipe.autoencoder  # noqa: B018 -- loaded by every process: orbax reads an export collectively
    if jax.process_index() == 0:
        image_io.save_image(np.clip(image_grid(pipe.decode(latents), columns=min(n, 8)), -1, 1), path)
