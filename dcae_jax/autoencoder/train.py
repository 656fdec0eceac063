"""One trainer for all three DC-AE phases; the phases differ only in config.

Phase 1: full model, low resolution, L1 (+ LPIPS), BatchNorm with batch statistics.
Phase 2: latent-adjacent layers only (encoder `project_out`, decoder `project_in`, optionally
         neighbouring stages) at high resolution; frozen layers get no backward pass.
Phase 3: decoder head only (+ PatchGAN discriminator) at low resolution; latents are unchanged.

Sections of `train_and_evaluate`: mesh -> model -> data -> optimizer/labels -> sharded state ->
restore (workdir checkpoint, else `config.init_from`, else scratch) -> loop -> export.
"""

import dataclasses
import functools
import json
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metrics as clu_metrics

from dcae_jax.autoencoder import losses
from dcae_jax.autoencoder.model import VARIANTS, DCAEConfig, DCAEModel, get_config, tiny_config
from dcae_jax.metrics import history
from dcae_jax.runtime import compute, distributed, paths, sharding
from dcae_jax.training import checkpoints, loop, optim

# ----------------------------------------------------------------------------------------------
# State and metrics.


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training; a pytree, checkpointed as a whole."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    ema_params: Any  # {} when EMA is off
    disc_params: Any  # {} without a discriminator
    disc_opt_state: Any
    rng: jax.Array  # raw uint32 key data (checkpoint friendly)


@flax.struct.dataclass
class TrainMetrics(clu_metrics.Collection):
    loss: clu_metrics.Average.from_output("loss")
    l1: clu_metrics.Average.from_output("l1")
    lpips: clu_metrics.Average.from_output("lpips")
    gen_loss: clu_metrics.Average.from_output("gen_loss")
    disc_loss: clu_metrics.Average.from_output("disc_loss")
    gan_weight: clu_metrics.Average.from_output("gan_weight")
    grad_norm: clu_metrics.Average.from_output("grad_norm")
    disc_grad_norm: clu_metrics.Average.from_output("disc_grad_norm")
    latent_channels: clu_metrics.Average.from_output("latent_channels")


@dataclasses.dataclass(frozen=True)
class Trainer:
    """The static pieces a step closes over (hashable by identity, never traced)."""

    model: DCAEModel
    tx: optax.GradientTransformation
    labels: Any
    train_batch_norm: bool
    l1_weight: float
    lpips_weight: float
    lpips_start: int
    lpips: Any  # linen module or None
    disc: Any  # linen module or None
    disc_tx: Any
    gan_weight: float
    adaptive_gan_weight: bool
    gan_loss: str
    disc_start: int
    ema_decay: float
    # DC-AE 1.5: each step decodes only the first c' latent channels, c' drawn from `latent_channels` with
    # probabilities `latent_channel_probs` (empty: uniform); () = always all channels.
    latent_channels: tuple[int, ...] = ()
    latent_channel_probs: tuple[float, ...] = ()

    __hash__ = object.__hash__
    __eq__ = object.__eq__


def model_config(config: ml_collections.ConfigDict) -> DCAEConfig:
    """The DCAEConfig named by `config.model.variant` ("tiny" or a released name; empty: the architecture of the
    `config.init_from` checkpoint, any format `DCAE.from_pretrained` reads) plus overrides."""
    variant = config.model.variant
    if not variant and config.get("init_from"):
        base = _init_from_architecture(str(config.init_from))
    else:
        base = tiny_config() if variant == "tiny" else get_config(variant) if variant in VARIANTS else None
    if base is None:
        raise KeyError(
            f"config.model.variant={variant!r}; valid: 'tiny', one of {sorted(VARIANTS)}, "
            "or empty with config.init_from set (its architecture)"
        )
    overrides = config.model.get("overrides", ml_collections.ConfigDict()).to_dict()
    overrides = {
        k: tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v
        for k, v in overrides.items()
    }
    return base.replace(**overrides)


@functools.lru_cache(maxsize=8)
def _init_from_architecture(path: str) -> DCAEConfig:
    """The architecture of the checkpoint at `path`, read once per process (a hub id or an original-format file
    costs a lookup or a full read; `model_config` is asked several times per run)."""
    from dcae_jax.autoencoder.pretrained import load_config

    return load_config(path)


# ----------------------------------------------------------------------------------------------
# The step.


def _head_grads(grads: Any) -> Any:
    return grads["decoder"]["head_conv"]


def sample_latent_channels(t: Trainer, rng: jax.Array, step: jax.Array) -> jax.Array | None:
    """The number of leading latent channels this step decodes (one draw per global batch, as DC-Gen's trainer);
    None when the config samples none. Depends only on the run's key and the step: exact on resume."""
    if not t.latent_channels:
        return None
    key = jax.random.fold_in(jax.random.wrap_key_data(rng), step)
    key = jax.random.fold_in(key, 0x1A7E)  # a stream of its own, apart from any other use of the run's key
    choices = jnp.asarray(t.latent_channels, jnp.int32)
    probs = jnp.asarray(t.latent_channel_probs, jnp.float32) if t.latent_channel_probs else None
    return jax.random.choice(key, choices, p=probs)


def train_step(state: TrainState, batch: dict[str, jax.Array], aux_vars: dict[str, Any], *, trainer: Trainer):
    """One optimisation step of the autoencoder (and the discriminator when configured)."""
    t = trainer
    x = batch["image"]  # (B, H, W, 3) in [-1, 1]
    step = state.step
    keep = sample_latent_channels(t, state.rng, step)  # None: every latent channel

    def loss_pair(params):
        p = optim.stop_frozen_gradients(params, t.labels)
        variables = {"params": p, "batch_stats": state.batch_stats}
        if t.train_batch_norm:
            (y, _), updates = t.model.apply(variables, x, train=True, keep_channels=keep, mutable=["batch_stats"])
            new_stats = updates["batch_stats"]
        else:
            y, _ = t.model.apply(variables, x, keep_channels=keep)
            new_stats = state.batch_stats
        l1 = losses.l1_loss(y, x)
        lp = t.lpips.apply(aux_vars["lpips"], y, x).mean() if t.lpips is not None else jnp.zeros(())
        rec = t.l1_weight * l1 + t.lpips_weight * lp
        if t.disc is not None:
            _, g_fn = losses.get_gan_loss(t.gan_loss)
            gen = g_fn(t.disc.apply({"params": state.disc_params}, y))
        else:
            gen = jnp.zeros(())
        return (rec, gen), (y, new_stats, l1, lp)

    if t.disc is None:
        (rec, gen), vjp_fn, (y, new_stats, l1, lp) = jax.vjp(loss_pair, state.params, has_aux=True)
        (grads,) = vjp_fn((jnp.ones(()), jnp.zeros(())))
        weight = jnp.zeros(())
    else:
        # One forward, two backward passes: the adaptive weight needs both gradients separately.
        (rec, gen), vjp_fn, (y, new_stats, l1, lp) = jax.vjp(loss_pair, state.params, has_aux=True)
        (g_rec,) = vjp_fn((jnp.ones(()), jnp.zeros(())))
        (g_gen,) = vjp_fn((jnp.zeros(()), jnp.ones(())))
        if t.adaptive_gan_weight:
            weight = losses.adaptive_gan_weight(_head_grads(g_rec), _head_grads(g_gen))
        else:
            weight = jnp.ones(())
        weight = weight * t.gan_weight * losses.disc_factor(step, t.disc_start)
        grads = jax.tree_util.tree_map(lambda a, b: a + weight * b, g_rec, g_gen)
    updates, opt_state = t.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": rec + weight * gen,
        "l1": l1,
        "lpips": lp,
        "gen_loss": gen,
        "gan_weight": weight,
        "grad_norm": optax.global_norm(grads),
        "latent_channels": jnp.asarray(t.model.config.latent_channels if keep is None else keep, jnp.float32),
    }

    disc_params, disc_opt_state = state.disc_params, state.disc_opt_state
    if t.disc is not None:
        d_fn, _ = losses.get_gan_loss(t.gan_loss)
        fake = jax.lax.stop_gradient(y)

        def disc_loss_fn(dp):
            logits_real = t.disc.apply({"params": dp}, x)
            logits_fake = t.disc.apply({"params": dp}, fake)
            return d_fn(logits_real, logits_fake) * losses.disc_factor(step, t.disc_start)

        d_loss, d_grads = jax.value_and_grad(disc_loss_fn)(disc_params)
        d_updates, disc_opt_state = t.disc_tx.update(d_grads, disc_opt_state, disc_params)
        disc_params = optax.apply_updates(disc_params, d_updates)
        metrics["disc_loss"] = d_loss
        metrics["disc_grad_norm"] = optax.global_norm(d_grads)
    else:
        metrics["disc_loss"] = jnp.zeros(())
        metrics["disc_grad_norm"] = jnp.zeros(())

    ema = state.ema_params
    if t.ema_decay > 0:
        ema = jax.tree_util.tree_map(lambda e, p: t.ema_decay * e + (1 - t.ema_decay) * p, ema, params)
    new_state = state.replace(
        step=step + 1,
        params=params,
        batch_stats=new_stats,
        opt_state=opt_state,
        ema_params=ema,
        disc_params=disc_params,
        disc_opt_state=disc_opt_state,
    )
    return new_state, TrainMetrics.single_from_model_output(**metrics)


@dataclasses.dataclass(frozen=True)
class EvalNets:
    """The evaluation networks (genuine weights): LPIPS AlexNet and the FID Inception; None when switched off."""

    lpips: Any = None
    fid: Any = None
    rfid_crop: int = 0  # 0: whole images; s: s x s crops on a stride-s/2 grid (patch rFID for tiny held-out sets)

    __hash__ = object.__hash__
    __eq__ = object.__eq__


def crops(x: jax.Array, size: int) -> jax.Array:
    """(B, H, W, C) -> (B * K, size, size, C): the size x size windows on a stride size/2 grid, image-major."""
    if size <= 0:
        return x
    h, w = x.shape[1:3]
    if size > min(h, w):
        raise ValueError(f"config.eval_rfid_crop={size} is larger than the {h}x{w} evaluation images")
    stride = max(size // 2, 1)
    windows = [
        x[:, i : i + size, j : j + size] for i in range(0, h - size + 1, stride) for j in range(0, w - size + 1, stride)
    ]
    return jnp.stack(windows, axis=1).reshape(-1, size, size, x.shape[-1])


def eval_step(params, batch_stats, batch, aux_vars, *, model: DCAEModel, nets: EvalNets):
    """Reconstructions, per-image PSNR/SSIM (reference evaluator conventions: on uint8-quantized images), LPIPS
    (AlexNet) and Inception pool3 features of real and reconstructed images (or of aligned crops of them)."""
    from dcae_jax.metrics import image as image_metrics

    x = batch["image"]
    y, z = model.apply({"params": params, "batch_stats": batch_stats}, x)
    psnr, ssim = image_metrics.psnr_ssim(x, y)
    xq, yq = image_metrics.quantize_uint8(x), image_metrics.quantize_uint8(y)
    out = {"psnr": psnr, "ssim": ssim}
    if nets.lpips is not None:
        out["lpips"] = nets.lpips.apply(aux_vars["eval_lpips"], *(u.astype(jnp.float32) / 127.5 - 1 for u in (yq, xq)))
    if nets.fid is not None:
        out["fid_real"] = nets.fid.apply(aux_vars["fid"], crops(xq, nets.rfid_crop))
        out["fid_recon"] = nets.fid.apply(aux_vars["fid"], crops(yq, nets.rfid_crop))
    return y, z, out


# ----------------------------------------------------------------------------------------------
# Building the pieces from the config.


def build_model(config: ml_collections.ConfigDict, cfg: DCAEConfig) -> DCAEModel:
    """The trained model: `config.model.dtype` computes (parameters stay float32; norms and the linear
    attention's sums in float32), `config.model.remat` per block (runtime.compute)."""
    return DCAEModel(
        cfg,
        dtype=compute.dtype(config.model.get("dtype", "float32")),
        remat=compute.remat_name(config.model.get("remat", "none")),
    )


def build_trainer(config: ml_collections.ConfigDict, cfg: DCAEConfig, params_abstract: Any) -> Trainer:
    labels = optim.label_params(params_abstract, [tuple(r) for r in config.trainable])
    o = config.optim
    tx = optim.masked(
        optim.adamw_with_warmup(
            o.learning_rate,
            weight_decay=o.weight_decay,
            b1=o.b1,
            b2=o.b2,
            eps=o.eps,
            warmup_steps=o.warmup_steps,
            decay_steps=o.get("decay_steps", 0),
            grad_clip=o.get("grad_clip", 0.0),
        ),
        labels,
    )
    loss_cfg = config.loss
    lpips_module = None
    if loss_cfg.lpips_weight > 0:
        from dcae_jax.metrics import lpips as lpips_lib

        lpips_module, _ = lpips_lib.load_lpips(lpips_weights_path(config))
    disc = disc_tx = None
    if config.disc.enabled:
        from dcae_jax.autoencoder.discriminator import PatchDiscriminator

        disc = PatchDiscriminator(
            base_features=config.disc.base_features,
            num_layers=config.disc.num_layers,
            norm=config.disc.norm,
            dtype=compute.dtype(config.model.get("dtype", "float32")),
        )
        disc_tx = optax.adam(config.disc.learning_rate, b1=config.disc.b1, b2=config.disc.b2)
        losses.get_gan_loss(loss_cfg.gan_loss)  # validate the name early
    return Trainer(
        model=build_model(config, cfg),
        tx=tx,
        labels=labels,
        train_batch_norm=config.train_batch_norm,
        l1_weight=loss_cfg.l1_weight,
        lpips_weight=loss_cfg.lpips_weight,
        lpips_start=int(loss_cfg.get("lpips_start", 0)),
        lpips=lpips_module,
        disc=disc,
        disc_tx=disc_tx,
        gan_weight=loss_cfg.gan_weight,
        adaptive_gan_weight=loss_cfg.adaptive_gan_weight,
        gan_loss=loss_cfg.gan_loss,
        disc_start=loss_cfg.disc_start,
        ema_decay=config.ema_decay,
        latent_channels=tuple(int(c) for c in config.get("latent_sampling", {}).get("channels", ())),
        latent_channel_probs=tuple(float(q) for q in config.get("latent_sampling", {}).get("probs", ())),
    )


def _init_state_fn(trainer: Trainer, cfg: DCAEConfig, resolution: int) -> Callable:
    def init(rng_data, params, batch_stats):
        rng = jax.random.wrap_key_data(rng_data)
        k_model, k_disc, k_state = jax.random.split(rng, 3)
        if params is None:
            variables = trainer.model.init(k_model, jnp.zeros((1, resolution, resolution, cfg.in_channels)))
            params, batch_stats = variables["params"], variables.get("batch_stats", {})
        disc_params, disc_opt = {}, {}
        if trainer.disc is not None:
            disc_params = trainer.disc.init(k_disc, jnp.zeros((1, resolution, resolution, cfg.in_channels)))["params"]
            disc_opt = trainer.disc_tx.init(disc_params)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=batch_stats,
            opt_state=trainer.tx.init(params),
            ema_params=params if trainer.ema_decay > 0 else {},
            disc_params=disc_params,
            disc_opt_state=disc_opt,
            rng=jax.random.key_data(k_state),
        )

    return init


def create_train_state(config, trainer: Trainer, cfg: DCAEConfig, mesh, init_variables: dict | None):
    """Shape-first, sharded init: shardings come from the abstract state, nothing is materialised twice."""
    rng = jax.random.key_data(jax.random.key(config.seed))
    params = batch_stats = None
    if init_variables is not None:
        params, batch_stats = init_variables["params"], init_variables.get("batch_stats", {})
    init = _init_state_fn(trainer, cfg, config.resolution)
    abstract = jax.eval_shape(init, rng, params, batch_stats)
    shardings = sharding.config_shardings(abstract, mesh, config)
    if params is not None:
        params = jax.device_put(params, shardings.params)
        batch_stats = jax.device_put(batch_stats, shardings.batch_stats)
    state = jax.jit(init, out_shardings=shardings)(rng, params, batch_stats)
    return state, shardings


# ----------------------------------------------------------------------------------------------
# The loop.


def _load_init_from(path: str) -> tuple[dict[str, Any], float | None]:
    """The variables of the model at `path` and its latent scaling factor (for the export)."""
    from dcae_jax.autoencoder.pretrained import DCAE

    ae = DCAE.from_pretrained(path)
    return jax.tree_util.tree_map(np.asarray, ae.variables), ae.config.scaling_factor


_UNREAD = object()


def export_scaling_factor(config, cfg: DCAEConfig, init_scaling: Any = _UNREAD) -> float | None:
    """The latent scaling factor an export may claim: an explicit `config.model.overrides.scaling_factor`; else the
    factor of the `init_from` model (its latent space is continued); else None: a model trained from scratch has
    no measured factor (the base architecture's would be wrong), so `precompute_latents` measures 1/RMS.
    `init_scaling`: the factor already read with the init model (skips reading it again)."""
    overrides = config.model.get("overrides", ml_collections.ConfigDict()).to_dict()
    if "scaling_factor" in overrides:
        return cfg.scaling_factor
    if config.get("init_from"):
        if init_scaling is not _UNREAD:
            return init_scaling
        from dcae_jax.autoencoder.pretrained import DCAE, EXPORT_CONFIG

        exported = paths.path(config.init_from, "config.init_from") / EXPORT_CONFIG
        if exported.is_file():  # our export (a resumed run): its recorded factor, without loading the weights
            return json.loads(exported.read_text()).get("scaling_factor")
        return DCAE.from_pretrained(config.init_from).config.scaling_factor
    return None


def lpips_weights_path(config) -> str:
    """`config.loss.lpips_weights`, or (empty) the genuine VGG16 LPIPS file, made on first use (metrics.weights)."""
    from dcae_jax.metrics import weights

    return weights.resolve("lpips_vgg", config.loss.lpips_weights)


def _lpips_aux(config) -> dict[str, Any]:
    if config.loss.lpips_weight > 0:
        from dcae_jax.metrics import lpips as lpips_lib

        _, variables = lpips_lib.load_lpips(lpips_weights_path(config))
        return {"lpips": variables}
    return {}


def eval_nets(config) -> tuple[EvalNets, dict[str, Any]]:
    """LPIPS (AlexNet) and FID Inception for the held-out evaluation (`config.eval_lpips`, `config.eval_rfid`),
    with the genuine weights (made on first use); their variables go beside the LPIPS loss's in `aux`."""
    from dcae_jax.metrics import fid as fid_lib
    from dcae_jax.metrics import lpips as lpips_lib
    from dcae_jax.metrics import weights

    nets, variables = {}, {}
    if config.get("eval_lpips", False):
        nets["lpips"], variables["eval_lpips"] = lpips_lib.load_lpips(weights.resolve("lpips_alex"))
    if config.get("eval_rfid", False):
        nets["fid"], variables["fid"] = fid_lib.load_fid_inception(weights.resolve("fid_inception"))
    return EvalNets(**nets, rfid_crop=config.get("eval_rfid_crop", 0)), variables


def check(config: ml_collections.ConfigDict) -> None:
    """Every field of a phase's config, without reading data or writing anything (a chain checks all its phases
    before the first one starts)."""
    check_config(config, model_config(config), sharding.mesh_from_config(config))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: paths.PathLike) -> dict[str, Any]:
    """Runs (or resumes) one training phase in `workdir`; returns the final evaluation summary.

    The config is checked before anything is written; the workdir is locked for the run (one trainer per workdir).
    """
    from dcae_jax.autoencoder.pretrained import load_config
    from dcae_jax.data import pipeline as input_pipeline

    check(config)
    workdir = paths.path(workdir, "workdir")
    # The inputs too: the training data listed (a missing or empty folder refused) and the init model found.
    train_source = input_pipeline.make_source(config.data.train, config.data.train_split)
    if config.init_from:  # a resumed run reads it too (its export's scaling factor): found before training
        load_config(config.init_from)
    with paths.workdir_lock(workdir, owner=jax.process_index() == 0):
        return _train_phase(config, workdir, train_source)


def _train_phase(config: ml_collections.ConfigDict, workdir: paths.Path, train_source) -> dict[str, Any]:
    from dcae_jax.autoencoder.pretrained import DCAE
    from dcae_jax.data import pipeline as input_pipeline

    # Mesh and model (the config was checked by `train_and_evaluate`).
    mesh = sharding.mesh_from_config(config)
    distributed.connect_collectives(mesh)
    cfg = model_config(config)
    workdir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    writer = loop.create_writer(workdir)
    data_sharding = sharding.batch_sharding(mesh)
    res = config.resolution
    abstract_vars = jax.eval_shape(DCAEModel(cfg).init, jax.random.key(0), jnp.zeros((1, res, res, cfg.in_channels)))
    trainer = build_trainer(config, cfg, abstract_vars["params"])
    logging.info(
        "trainable parameters (phase %s):\n%s",
        config.phase,
        optim.trainable_table(abstract_vars["params"], trainer.labels),
    )
    if is_main:
        paths.write_text_atomic(
            workdir / "trainable_params.md", optim.trainable_table(abstract_vars["params"], trainer.labels)
        )

    # Data.
    train_loader = input_pipeline.make_train_loader(
        train_source,
        resolution=res,
        global_batch_size=config.global_batch_size,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        num_workers=config.data.num_workers,
        crop_scale=tuple(config.data.crop_scale) if config.data.get("crop_scale") else None,
        channel_shuffle=bool(config.data.get("channel_shuffle", False)),
        decoded_cache_mb=int(config.data.get("decoded_cache_mb", input_pipeline.DECODED_CACHE_MB)),
    )
    train_iter = iter(train_loader)

    # State: workdir checkpoint > init_from > scratch.
    mngr = checkpoints.manager(workdir, config.keep_checkpoints)
    latest = mngr.latest_step()
    init_vars, init_scaling = None, _UNREAD
    if latest is None and config.init_from:
        init_vars, init_scaling = _load_init_from(config.init_from)
        logging.info("initialised from %s", config.init_from)
    state, shardings = create_train_state(config, trainer, cfg, mesh, init_vars)
    if latest is not None:
        abstract = checkpoints.abstract_with_shardings(jax.eval_shape(lambda s: s, state), shardings)
        state = checkpoints.restore(mngr, latest, abstract, train_iter)
        logging.info("resumed from step %d", latest)

    nets, eval_vars = eval_nets(config)
    aux = jax.device_put({**_lpips_aux(config), **eval_vars}, sharding.replicated(mesh))
    step_fn = loop.jit_step(
        functools.partial(train_step, trainer=trainer),
        shardings,
        data_sharding,
        1,
        donate=config.get("donate_state", True),
    )
    step_fn_l1 = step_fn  # steps <= config.loss.lpips_start: L1 only (its own compiled step, no VGG pass)
    if trainer.lpips is not None and trainer.lpips_start > 0:
        l1_only = dataclasses.replace(trainer, lpips=None, lpips_weight=0.0)
        step_fn_l1 = loop.jit_step(
            functools.partial(train_step, trainer=l1_only),
            shardings,
            data_sharding,
            1,
            donate=config.get("donate_state", True),
        )
    # Evaluation is data-parallel like training: images split over every mesh device, outputs kept split.
    eval_fn = functools.partial(
        # float32 whatever the training dtype: held-out numbers are comparable across runs and with the paper's.
        jax.jit(functools.partial(eval_step, model=DCAEModel(cfg), nets=nets), out_shardings=data_sharding),
        aux_vars=aux,
    )

    def next_batch():
        local = next(train_iter)
        return sharding.global_batch({"image": local["image"]}, data_sharding), int(np.sum(local.get("skipped", 0)))

    # Metrics that are zero by construction in this phase are not logged (no LPIPS term, no discriminator).
    unused = set() if trainer.lpips is not None else {"lpips"}
    if trainer.disc is None:
        unused |= {"gen_loss", "disc_loss", "gan_weight", "disc_grad_norm"}
    this_run = loop.Loop(
        step=lambda s, batch, step: (step_fn if step > trainer.lpips_start else step_fn_l1)(s, batch, aux),
        next_batch=next_batch,
        schedule=learning_rate_schedule(config.optim),
        unit="images",
        name=f"training phase {config.phase}",
        every=config.eval_every,
        periodic=lambda step, s: evaluate(config, s, eval_fn, workdir, writer, step, mesh),
        unused=frozenset(unused),
    )
    state, last_summary = loop.run(
        this_run, state, config, mngr=mngr, data_iter=train_iter, workdir=workdir, writer=writer
    )

    # Export the final model in the format DCAE.from_pretrained loads.
    final = evaluate(config, state, eval_fn, workdir, writer, config.num_steps, mesh)
    final["train"] = last_summary
    variables = {"params": state.ema_params if trainer.ema_decay > 0 else state.params}
    variables["batch_stats"] = state.batch_stats
    del state  # frees the optimizer state (and the non-exported parameter copy) before the export gathers
    variables = checkpoints.host_variables(variables)
    export_cfg = cfg.replace(scaling_factor=export_scaling_factor(config, cfg, init_scaling))
    DCAE(export_cfg, variables).save_pretrained(workdir / "export")  # every process: orbax's save is collective
    if is_main:
        paths.write_text_atomic(workdir / "eval.json", json.dumps(final, indent=2))
        keys = ["loss", "l1", "lpips", "gen_loss", "disc_loss", "gan_weight", "grad_norm", "learning_rate"]
        history.plot(workdir, keys, f"{cfg.name}, phase {config.phase}")
    writer.flush()
    return final


def check_config(config, cfg: DCAEConfig, mesh) -> None:
    """Autoencoder fields, then the shared loop fields; raises naming every bad field."""
    problems = []
    if config.get("phase") not in (1, 2, 3):
        problems.append(f"config.phase={config.get('phase')!r} must be 1, 2 or 3 (set it with the config's phase arg)")
    f = cfg.spatial_compression_ratio
    for key in ("resolution", "eval_resolution"):
        v = config.get(key) or 0
        if (key == "resolution" and v < 1) or v % f:
            problems.append(f"config.{key}={v} must be a positive multiple of the model's compression factor {f}")
    start = config.loss.get("lpips_start", 0)
    if not isinstance(start, int) or start < 0:
        problems.append(f"config.loss.lpips_start={start!r} must be a non-negative integer")
    sampling = config.get("latent_sampling", {})
    channels, probs = tuple(sampling.get("channels", ())), tuple(sampling.get("probs", ()))
    if channels:
        if not cfg.adaptive_latent:
            problems.append(
                f"config.latent_sampling.channels={channels}: {cfg.name} has shortcuts around its latent, so a "
                "channel prefix does not decode; set model.overrides encoder_out_shortcut and decoder_in_shortcut "
                "to False (as DC-AE 1.5)"
            )
        if any(not isinstance(c, int) or not 1 <= c <= cfg.latent_channels for c in channels):
            problems.append(f"config.latent_sampling.channels={channels} must be integers in 1..{cfg.latent_channels}")
        if probs and (len(probs) != len(channels) or min(probs) < 0 or abs(sum(probs) - 1) > 1e-6):
            problems.append(
                f"config.latent_sampling.probs={probs} must be {len(channels)} non-negative numbers summing to 1 "
                "(or empty: uniform)"
            )
    elif probs:
        problems.append("config.latent_sampling.probs is set but config.latent_sampling.channels is empty")
    crop = config.get("eval_rfid_crop", 0)
    if config.get("eval_rfid") and crop and crop > (config.get("eval_resolution") or config.get("resolution") or 0):
        problems.append(f"config.eval_rfid_crop={crop} is larger than the evaluation resolution")
    loop.raise_config_problems(problems + loop.config_problems(config, mesh))


def lower_train_step(config: ml_collections.ConfigDict, devices=None, platforms: tuple[str, ...] | None = None):
    """The train step lowered for abstract inputs (no data, no weights): for memory/FLOP analysis and AOT.

    `devices` (default: this host's) may be compile-only TPU devices from `jax.experimental.topologies`.
    `platforms` lowers for other platforms than the devices' (e.g. ("cuda",) on a CPU host, to count a GPU
    step's FLOPs; such a lowering cannot be compiled here).
    """
    mesh = sharding.mesh_from_config(config, devices)
    cfg = model_config(config)
    res = config.resolution
    abstract_vars = jax.eval_shape(DCAEModel(cfg).init, jax.random.key(0), jnp.zeros((1, res, res, cfg.in_channels)))
    trainer = build_trainer(config, cfg, abstract_vars["params"])
    rng = jax.random.key_data(jax.random.key(0))
    abstract = jax.eval_shape(_init_state_fn(trainer, cfg, res), rng, None, None)
    shardings = sharding.config_shardings(abstract, mesh, config)
    data_sharding = sharding.batch_sharding(mesh)
    batch = {
        "image": jax.ShapeDtypeStruct(
            (config.global_batch_size, res, res, cfg.in_channels), jnp.float32, sharding=data_sharding
        )
    }
    aux = jax.eval_shape(lambda: _lpips_aux(config))
    step_fn = loop.jit_step(
        functools.partial(train_step, trainer=trainer),
        shardings,
        data_sharding,
        1,
        donate=config.get("donate_state", True),
    )
    args = (checkpoints.abstract_with_shardings(abstract, shardings), batch, aux)
    if platforms:
        return step_fn.trace(*args).lower(lowering_platforms=platforms)
    return step_fn.lower(*args)


def learning_rate_schedule(o: ml_collections.ConfigDict) -> optax.Schedule:
    """The optimizer's schedule (`optim.adamw_with_warmup`): linear warm-up, then constant or cosine decay."""
    return optim.warmup_schedule(o.learning_rate, o.warmup_steps, o.get("decay_steps", 0))


def _pad_rows(images: np.ndarray, mask: np.ndarray, multiple: int) -> tuple[np.ndarray, np.ndarray]:
    """Pads a local batch (and its mask, with False) to a multiple of `multiple` rows."""
    pad = -len(images) % multiple
    if not pad:
        return images, mask
    return (
        np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)]),
        np.concatenate([mask, np.zeros((pad,), bool)]),
    )


def evaluate(config, state, eval_fn, workdir, writer, step, mesh, write: bool = True) -> dict[str, float]:
    """Held-out PSNR/SSIM, LPIPS (AlexNet) and rFID (and a reconstruction grid) with running BatchNorm statistics.

    rFID: Frechet distance between the Inception features of the real and the reconstructed held-out images (or
    of aligned crops of them, `config.eval_rfid_crop`), float64 statistics over every process.
    """
    from dcae_jax.data import batches
    from dcae_jax.data import images as image_io
    from dcae_jax.data import pipeline as input_pipeline
    from dcae_jax.metrics import fid as fid_lib

    source = input_pipeline.make_source(config.data.eval, config.data.eval_split)
    loader = input_pipeline.make_eval_loader(
        source,
        resolution=config.eval_resolution or config.resolution,
        batch_size=config.eval_batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    params = state.ema_params if config.ema_decay > 0 else state.params
    data_sharding = sharding.batch_sharding(mesh)
    per_process = mesh.devices.size // jax.process_count()  # this process's devices in the mesh
    per_batch, grid = [], None  # (psnr, ssim, lpips, mask) rows: same shapes and count on every process
    fid_stats = {"fid_real": fid_lib.FeatureStats(), "fid_recon": fid_lib.FeatureStats()}
    for batch in loader:
        images, mask = _pad_rows(np.asarray(batch["image"]), np.asarray(batch["mask"]) > 0, per_process)
        x = jax.make_array_from_process_local_data(data_sharding, images)
        y, _, m = eval_fn(params, state.batch_stats, {"image": x})
        y, m = batches.local_rows(y), {k: batches.local_rows(v) for k, v in m.items()}
        lp = m.get("lpips", jnp.full(mask.shape, jnp.nan))
        per_batch.append(np.stack([np.asarray(v, np.float32) for v in (m["psnr"], m["ssim"], lp, mask)]))
        for k, s in fid_stats.items():
            if k in m:
                f = np.asarray(m[k])
                s.update(f, np.repeat(mask, f.shape[0] // mask.shape[0]))
        if grid is None and mask.any():  # a process can get only padding (more processes than images)
            x_np, y_np = images[mask][:8], np.asarray(y)[mask][:8]
            grid = np.concatenate([np.concatenate(list(x_np), 1), np.concatenate(list(y_np), 1)], 0)
    values = np.concatenate(per_batch, axis=1)
    values = distributed.process_concat(values, axis=1)  # every process's images, not only this process's share
    psnrs, ssims, lpipss = values[:3, values[3] > 0]
    out = {"psnr": float(np.mean(psnrs)), "ssim": float(np.mean(ssims))}
    if not np.all(np.isnan(lpipss)):  # NaN marks "LPIPS switched off"
        out["lpips"] = float(np.mean(lpipss))
    real, recon = (fid_lib.allreduce_stats(s) for s in fid_stats.values()) if config.get("eval_rfid") else (None, None)
    if real is not None and real.count >= 2:
        out["rfid"] = fid_lib.frechet_distance(*real.mu_sigma(), *recon.mu_sigma())
        out["rfid_features"] = real.count
    out["num_images"] = int(psnrs.size)
    if write and jax.process_index() == 0:
        writer.write_scalars(step, {f"eval/{k}": v for k, v in out.items()})
        if grid is not None:
            image_io.save_image(np.clip(grid, -1, 1), workdir / "samples" / f"recon_step{step:07d}.png")
            writer.write_images(step, {"eval/reconstructions": ((np.clip(grid, -1, 1) + 1) / 2)[None]})
    return out
