"""UViT / USiT training on precomputed DC-AE latents: the reference recipe on a sharded JAX step.

The same machinery as the autoencoder trainer (`dcae_jax.autoencoder.train`): a `data x fsdp` mesh with sharding
rules from the config, a jitted `train_step(state, batch)` with donated state, orbax checkpoints that
hold the state and the data iterator (exact resume), clu metrics fetched only at log steps.

What differs is the model and objective: `config.objective` "epsilon" (UViT, SD scaled-linear
1000-step schedule, integer time input) or "velocity" (USiT, SiT linear interpolant, t in [0, 1]);
AdamW on every parameter (the reference applies weight decay to all of them); an EMA with the
reference's warm-up, decay_k = decay * (1 - exp(-k / ema.warmup_steps)); periodic class-conditional
sample grids decoded by the autoencoder. The final model goes to `<workdir>/export`
(`DCAEDiffusion.from_pretrained` loads it).
"""

import dataclasses
import functools
import json
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metrics as clu_metrics

from dcae_jax.diffusion import objectives
from dcae_jax.diffusion.uvit import UViT, UViTConfig, get_uvit_config
from dcae_jax.metrics import history
from dcae_jax.runtime import compute, distributed, paths, sharding
from dcae_jax.training import checkpoints, loop

OBJECTIVES = {"epsilon": objectives.EpsilonObjective, "velocity": objectives.VelocityObjective}


@flax.struct.dataclass
class DiffusionState:
    """Everything that changes during training; a pytree, checkpointed as a whole."""

    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any  # {} when EMA is off
    rng: jax.Array  # raw uint32 key data; step keys are fold_in(rng, step), so a resume is exact


@flax.struct.dataclass
class DiffusionMetrics(clu_metrics.Collection):
    loss: clu_metrics.Average.from_output("loss")
    grad_norm: clu_metrics.Average.from_output("grad_norm")


@dataclasses.dataclass(frozen=True)
class DiffusionTrainer:
    """The static pieces a step closes over (hashable by identity, never traced)."""

    model: UViT
    objective: Any  # EpsilonObjective | VelocityObjective
    tx: optax.GradientTransformation
    ema_decay: float
    ema_warmup_steps: int


def get_objective(name: str):
    if name not in OBJECTIVES:
        raise KeyError(f"config.objective={name!r}; valid: {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]()


def model_config(
    config: ml_collections.ConfigDict, latent_shape: tuple[int, int, int], num_classes: int | None = None
) -> UViTConfig:
    """The UViT for latents of shape (H, W, C): preset + patch size + overrides from the config; the label table
    has the data's `num_classes` unless the overrides set `num_classes`."""
    h, w, c = latent_shape
    if h != w:
        raise ValueError(f"UViT needs square latents, the data has {h}x{w}")
    overrides = dict(config.model.get("overrides", {}) or {})
    if num_classes and "num_classes" not in overrides:
        overrides["num_classes"] = num_classes
    return get_uvit_config(
        config.model.preset, in_channels=c, input_size=h, patch_size=config.model.patch_size, **overrides
    )


def build_model(config: ml_collections.ConfigDict, cfg: UViTConfig) -> UViT:
    """The trained UViT: compute dtype, per-block remat policy and attention kernel from `config.model`
    (runtime.compute; parameters stay float32)."""
    m = config.model
    return UViT(
        cfg,
        dtype=compute.dtype(m.get("dtype", "float32")),
        remat=compute.remat_name(m.get("remat", "none")),
        attention=m.get("attention", "auto"),
    )


def learning_rate_schedule(o: ml_collections.ConfigDict) -> optax.Schedule:
    """The reference's constant-with-warm-up: lr * (k + 1) / warmup for k < warmup, then lr."""
    lr, warmup = o.learning_rate, max(o.warmup_steps, 1)
    return lambda count: lr * jnp.minimum((count + 1) / warmup, 1.0)


def build_trainer(config: ml_collections.ConfigDict, cfg: UViTConfig) -> DiffusionTrainer:
    o = config.optim
    parts = [optax.clip_by_global_norm(o.grad_clip)] if o.get("grad_clip", 0.0) > 0 else []
    parts.append(optax.adamw(learning_rate_schedule(o), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay))
    return DiffusionTrainer(
        model=build_model(config, cfg),
        objective=get_objective(config.objective),
        tx=optax.chain(*parts),
        ema_decay=config.ema.decay,
        ema_warmup_steps=config.ema.warmup_steps,
    )


def ema_decay_at(step: jax.Array, decay: float, warmup_steps: int) -> jax.Array:
    """decay * (1 - exp(-step / warmup)): early EMA follows the weights, later it averages them."""
    if warmup_steps <= 0:
        return jnp.asarray(decay, jnp.float32)
    return decay * -jnp.expm1(-step.astype(jnp.float32) / warmup_steps)  # 1 - exp(-x), exact for small x


def train_step(state: DiffusionState, batch: dict[str, jax.Array], *, trainer: DiffusionTrainer):
    """One AdamW step on the objective's loss (label dropout inside the model), then the EMA update."""
    t = trainer
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    k_objective, k_dropout = jax.random.split(key)
    latents, labels = batch["latent"], batch["label"]  # (B, H, W, C) scaled latents, (B,) int32

    def loss_fn(params):
        def apply_fn(x_t, time):  # time: (B,) as the objective feeds it to the network
            return t.model.apply({"params": params}, x_t, time, labels, train=True, rngs={"label_dropout": k_dropout})

        return t.objective.loss(apply_fn, latents, k_objective)

    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = t.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    step = state.step + 1
    ema = state.ema_params
    if t.ema_decay > 0:
        d = ema_decay_at(step, t.ema_decay, t.ema_warmup_steps)
        ema = jax.tree_util.tree_map(lambda e, p: e - (1.0 - d) * (e - p), ema, params)
    new_state = state.replace(step=step, params=params, opt_state=opt_state, ema_params=ema)
    metrics = DiffusionMetrics.single_from_model_output(loss=loss, grad_norm=optax.global_norm(grads))
    return new_state, metrics


def _init_state_fn(trainer: DiffusionTrainer, cfg: UViTConfig):
    from dcae_jax.diffusion.uvit import init_uvit_params

    def init(rng_data, params):
        rng = jax.random.wrap_key_data(rng_data)
        k_params, k_state = jax.random.split(rng)
        if params is None:
            params = init_uvit_params(cfg, k_params)
        return DiffusionState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=trainer.tx.init(params),
            ema_params=params if trainer.ema_decay > 0 else {},
            rng=jax.random.key_data(k_state),
        )

    return init


def _state_shardings(config, trainer, cfg, mesh):
    rng = jax.random.key_data(jax.random.key(config.seed))
    init = _init_state_fn(trainer, cfg)
    abstract = jax.eval_shape(init, rng, None)
    return init, rng, abstract, sharding.config_shardings(abstract, mesh, config)


def create_train_state(config, trainer: DiffusionTrainer, cfg: UViTConfig, mesh):
    """Shape-first, sharded init: each device materialises only its shard."""
    init, rng, _, shardings = _state_shardings(config, trainer, cfg, mesh)
    state = jax.jit(init, static_argnums=(1,), out_shardings=shardings)(rng, None)
    return state, shardings


def lower_train_step(config: ml_collections.ConfigDict, devices=None):
    """The train step lowered for abstract inputs (no data, no weights), for `dcae_jax.aot`."""

    mesh = sharding.mesh_from_config(config, devices)
    h, w, c = config.data.latent_shape
    cfg = model_config(config, (h, w, c))
    trainer = build_trainer(config, cfg)
    _, _, abstract, shardings = _state_shardings(config, trainer, cfg, mesh)
    data_sharding = sharding.batch_sharding(mesh)
    b = config.global_batch_size
    batch = {
        "latent": jax.ShapeDtypeStruct((b, h, w, c), jnp.float32, sharding=data_sharding),
        "label": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=data_sharding),
    }
    step_fn = loop.jit_step(
        functools.partial(train_step, trainer=trainer),
        shardings,
        data_sharding,
        donate=config.get("donate_state", True),
    )
    return step_fn.lower(checkpoints.abstract_with_shardings(abstract, shardings), batch)


# ----------------------------------------------------------------------------------------------
# Latents: precomputed, or computed into the workdir from images and an autoencoder.


def _latents_dir(config, workdir: paths.Path) -> paths.Path:
    if config.data.latents:
        return paths.path(config.data.latents, "config.data.latents")
    if not config.autoencoder:
        raise ValueError(
            "config.data.latents is empty and there is no config.autoencoder to compute them with: run "
            "`python -m dcae_jax.precompute_latents` and set config.data.latents, or set config.autoencoder "
            "and config.data.images"
        )
    from dcae_jax.data import precompute

    out = workdir / "latents"
    precompute.precompute(
        model=config.autoencoder,
        data=config.data.images,
        split=config.data.get("images_split", "train"),
        resolution=config.data.resolution,
        out=out,
        batch_size=config.data.get("encode_batch_size", 8),
        scaling_factor=config.data.get("scaling_factor") or None,  # "" -> the autoencoder's (else 1/RMS)
        latent_channels=config.data.get("latent_channels") or None,  # 0 -> all (else a DC-AE 1.5 channel prefix)
    )
    return out


# ----------------------------------------------------------------------------------------------
# The loop.


def sampler_overrides(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The sampler settings of `config.sample` (the grids' and the export's), without the grids' cadence."""
    return {k: v for k, v in config.sample.to_dict().items() if k != "every"}


def check(config: ml_collections.ConfigDict) -> None:
    """Every field that can be checked without the data (objective, model, sampler, loop), one `ConfigError`
    naming each bad one, before anything is read, written or compiled (as `autoencoder.train.check`)."""
    from dcae_jax.diffusion.pipeline import sampler_settings

    problems = []
    if config.objective not in OBJECTIVES:
        problems.append(f"config.objective={config.objective!r}; valid: {sorted(OBJECTIVES)}")
    else:
        try:
            sampler_settings(config.objective, sampler_overrides(config))
        except (KeyError, ValueError) as err:
            problems.append(f"config.sample: {err.args[0]}")
    try:
        model_config(config, tuple(config.data.latent_shape))
    except KeyError as err:
        problems.append(f"config.model.preset: {err.args[0]}")
    except TypeError as err:  # dataclasses.replace with a field UViTConfig does not have
        problems.append(f"config.model.overrides={dict(config.model.overrides)}: {err}")
    every = config.sample.get("every")
    if not isinstance(every, int) or isinstance(every, bool) or every < 0:
        problems.append(f"config.sample.every={every!r} must be 0 (no grids) or a positive integer")
    loop.raise_config_problems(problems + loop.config_problems(config, sharding.mesh_from_config(config)))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: paths.PathLike) -> dict[str, Any]:
    """Runs (or resumes) UViT training in `workdir`; returns the final summary. The loop fields are checked before
    anything is written; the workdir is locked for the run (one trainer per workdir)."""
    from dcae_jax.data.latents import LatentDataset

    check(config)
    workdir = paths.path(workdir, "workdir")
    if config.data.latents:  # found and readable, and decodable by the autoencoder, before anything is written
        data = LatentDataset(config.data.latents)
        if config.autoencoder:
            from dcae_jax.autoencoder.pretrained import load_config
            from dcae_jax.diffusion.pipeline import check_autoencoder_fits

            ae_config = load_config(config.autoencoder)
            check_autoencoder_fits(ae_config, data.latent_shape[-1], config.autoencoder, config.data.latents)
    with paths.workdir_lock(workdir, owner=jax.process_index() == 0):
        return _train(config, workdir)


def _train(config: ml_collections.ConfigDict, workdir: paths.Path) -> dict[str, Any]:
    from dcae_jax.data.latents import LatentDataset, make_latent_train_loader
    from dcae_jax.diffusion.pipeline import DCAEDiffusion, sample_grid

    workdir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    writer = loop.create_writer(workdir)

    latents_dir = _latents_dir(config, workdir)
    dataset = LatentDataset(latents_dir)
    cfg = model_config(config, dataset.latent_shape, dataset.num_classes)
    if dataset.num_classes > cfg.num_classes:
        raise ValueError(
            f"{latents_dir} has {dataset.num_classes} classes, the model's label table {cfg.num_classes}: set "
            f"config.model.overrides.num_classes"
        )
    mesh = sharding.mesh_from_config(config)
    distributed.connect_collectives(mesh)
    data_sharding = sharding.batch_sharding(mesh)
    trainer = build_trainer(config, cfg)
    train_iter = iter(
        make_latent_train_loader(
            latents_dir,
            global_batch_size=config.global_batch_size,
            seed=config.seed,
            worker_count=config.data.num_workers,
        )
    )

    mngr = checkpoints.manager(workdir, config.keep_checkpoints)
    latest = mngr.latest_step()
    state, shardings = create_train_state(config, trainer, cfg, mesh)
    if latest is not None:
        abstract = checkpoints.abstract_with_shardings(jax.eval_shape(lambda s: s, state), shardings)
        state = checkpoints.restore(mngr, latest, abstract, train_iter)
        logging.info("resumed from step %d", latest)
    logging.info("%s: %.2fM parameters, %d tokens", cfg.name, _num_params(state.params) / 1e6, cfg.seq_len)

    step_fn = loop.jit_step(
        functools.partial(train_step, trainer=trainer),
        shardings,
        data_sharding,
        donate=config.get("donate_state", True),
    )

    sampling_pipe: DCAEDiffusion | None = None  # built once: its autoencoder and compiled sampler are reused

    def pipeline(params) -> DCAEDiffusion:
        nonlocal sampling_pipe
        if sampling_pipe is None:
            sampling_pipe = DCAEDiffusion(
                cfg,
                params,
                objective=config.objective,
                scaling_factor=dataset.scaling_factor,
                sampler=sampler_overrides(config),
                autoencoder=config.autoencoder or dataset.metadata.get("model", ""),
                classes=dataset.trained_classes,
                mesh=mesh,
            )
        sampling_pipe.params = params
        return sampling_pipe

    def sampled(s: DiffusionState):  # the weights samples and the export are made with
        return s.ema_params if trainer.ema_decay > 0 else s.params

    def write_samples(step: int, params) -> None:
        """Every process samples with the parameters as they are sharded (none gathered); process 0 writes."""
        if not config.autoencoder:
            return
        pipe = pipeline(params)
        path = workdir / "samples" / f"step{step:07d}.png"
        sample_grid(pipe, path, seed=config.seed)
        pipe.params = None  # no reference to the state's buffers (the next step donates them)
        if is_main:
            logging.info("samples at step %d: %s", step, path)

    def next_batch():
        local = next(train_iter)
        return sharding.global_batch({"latent": local["latent"], "label": local["label"]}, data_sharding), 0

    this_run = loop.Loop(
        step=lambda s, batch, step: step_fn(s, batch),
        next_batch=next_batch,
        schedule=learning_rate_schedule(config.optim),
        unit="latents",
        name=f"training {cfg.name} ({config.objective})",
        every=config.sample.every,
        periodic=lambda step, s: write_samples(step, sampled(s)),
    )
    state, last_summary = loop.run(
        this_run, state, config, mngr=mngr, data_iter=train_iter, workdir=workdir, writer=writer
    )

    params = sampled(state)
    del state  # the optimizer state and the other weights are freed before the last samples and the export
    write_samples(config.num_steps, params)
    params = checkpoints.host_variables(params)  # one leaf at a time, to every process's host
    pipe = pipeline(params)
    # A local autoencoder folder is copied into the export, so that the export stays loadable when moved.
    pipe.save_pretrained(workdir / "export", bundle_autoencoder=True)  # every process: the save is collective
    result = {"train": last_summary, "steps": config.num_steps, "model": cfg.name, "objective": config.objective}
    if is_main:
        paths.write_text_atomic(workdir / "eval.json", json.dumps(result, indent=2))
        history.plot(workdir, ["loss", "grad_norm", "learning_rate"], f"{cfg.name} ({config.objective})")
    writer.flush()
    return result


def _num_params(params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
