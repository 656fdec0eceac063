"""How the models compute: the compute dtype, the rematerialisation policy and the attention kernel, each named
in the config (`config.model.dtype`, `config.model.remat`, `config.model.attention`) and resolved here.

* `dtype(name)`: "float32" or "bfloat16" for activations and matmuls. Parameters, optimizer state and EMA stay
  float32 whatever the compute dtype; every model keeps its norms (RMSNorm, BatchNorm, LayerNorm, GroupNorm
  statistics), the linear attention's sums and the softmax in float32.
* `remat_policy(name)`: which activations a block keeps for the backward pass. "none" keeps all of them (no
  recomputation); "full" keeps only the block's inputs and recomputes the rest (least memory, ~1/3 more
  FLOPs); "dots" keeps the matmul/conv outputs and recomputes the cheap elementwise work between them;
  "dots_no_batch" keeps only the weight matmuls' outputs (for attention models: recomputes the attention
  scores, which grow with the sequence length squared).
* `attention_implementation(name, dtype, head_dim)`: the kernel of `jax.nn.dot_product_attention` in UViT and
  DiT. "auto" picks cuDNN's fused attention on a GPU where cuDNN supports the call (bf16/fp16, head_dim a
  multiple of 8 up to 128) and XLA's otherwise (CPU, TPU, float32); "xla" and "cudnn" force one.
* `conv_kernel_grad()`: how a 3x3 conv's kernel gradient runs on the CPU, from `$DCAE_JAX_CONV_KERNEL_GRAD`:
  "dots" computes the gradients of kernels with 64+ input channels as matmuls (`layers.kernel_grad_as_dots`),
  "xla" keeps XLA's own transposed conv for all of them, "auto" (the default) picks "dots" on x86 CPUs (Intel and
  AMD) and "xla" on every other (unmeasured there). Measured (docs/performance.md): XLA's own kernel-gradient conv
  is 3-5x slower than the matmuls at the released models' widths; the 256² phase-1 step went from 34.5 to 23.1 s
  with them on an Intel Xeon and from 44.9 to 26.2 s on an AMD EPYC (Zen 3, AVX2). Read when a step is traced;
  GPUs and TPUs always use XLA's conv.
* `conv3x3()`: how wide float32 3x3 convs and their input gradients run on the CPU, from `$DCAE_JAX_CONV3X3`:
  "winograd" (the default) as Winograd F(2x2, 3x3) (`layers.conv3x3_winograd`: 2.25x fewer multiplies, matmuls
  over the tiles) where `layers.winograd_fits` says it is faster, "xla" always XLA's conv. XLA:CPU runs its convs
  near the processor's peak FLOP rate, as torch's oneDNN does, so fewer FLOPs is what makes ours faster there.
  Read when a step is traced; GPUs and TPUs always use XLA's conv.
* `set_host_malloc(cpu)`: the host allocator policy of a command's process, from `$DCAE_JAX_HOST_MALLOC`. XLA:CPU
  allocates every executable's temporary buffer (MiBs for the quickstart's step, GiBs for a 256² DC-AE step) with
  the C library's malloc and frees it after the call; glibc serves such sizes with fresh `mmap`s, so every step
  page-faults its whole working set again (1.2 M faults per 40 quickstart steps, ~20% of the step in the kernel).
  "reuse" makes glibc keep freed memory for the next call: one arena for all threads (thread arenas cannot hold
  blocks over 32 MiB), no `mmap` for large blocks, no trimming of the heap (`mallopt`), so the process keeps its
  peak heap until it exits. "system" leaves glibc as it is; "auto" (the default) picks "reuse" when the command
  computes on the CPU and nothing else set glibc's malloc tunables (`$GLIBC_TUNABLES`), "system" otherwise
  (accelerators compute in device memory; their hosts' data loaders keep per-thread arenas). It only works
  before other threads allocate, so commands call it first (`cli.prepare_process`), never a library.
* `GPU_XLA_FLAGS`: the XLA flags worth knowing for GPU throughput, each with what it changes (docs/performance.md
  lists them; a test checks that this XLA still knows every one). None is set for you.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
ATTENTION = ("auto", "xla", "cudnn")
CONV_KERNEL_GRAD_ENV = "DCAE_JAX_CONV_KERNEL_GRAD"
CONV_KERNEL_GRAD = ("auto", "dots", "xla")
CONV3X3_ENV = "DCAE_JAX_CONV3X3"
CONV3X3 = ("winograd", "xla")
HOST_MALLOC_ENV = "DCAE_JAX_HOST_MALLOC"
HOST_MALLOC = ("auto", "reuse", "system")
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # glibc's malloc.h
_host_malloc = "system"  # what set_host_malloc applied to this process
# Set through the environment before jax starts: XLA_FLAGS="--flag=value --flag=value". Unmeasured here (no GPU).
GPU_XLA_FLAGS = {
    "--xla_gpu_enable_latency_hiding_scheduler=true": "schedules the asynchronous collectives (data-parallel "
    "gradient all-reduces, FSDP all-gathers / reduce-scatters) to overlap with compute instead of waiting for each; "
    "matters with more than one GPU",
    "--xla_gpu_all_reduce_combine_threshold_bytes=134217728": "combines the many per-parameter gradient "
    "all-reduces into fewer, larger NCCL calls (up to 128 MiB each): fewer launches and better bandwidth",
    "--xla_gpu_enable_triton_gemm=false": "runs every matmul through cuBLAS/cuBLASLt instead of Triton-generated "
    "GEMMs; try both for the large bf16 matmuls of UViT-H / DiT-XL (autotuning does not always pick the faster)",
    "--xla_gpu_enable_command_buffer=": "(empty) turns CUDA graphs off: each kernel is launched on its own; for "
    "debugging and profiling (default on: small kernels of a step replay as one graph, less launch overhead)",
    "--xla_gpu_deterministic_ops=true": "bit-reproducible runs (deterministic reductions and scatter); slower, "
    "for debugging a divergence between two runs, never for throughput",
}


def dtype(name: str, field: str = "config.model.dtype") -> jnp.dtype:
    if name not in DTYPES:
        raise KeyError(f"{field}={name!r}; valid: {sorted(DTYPES)}")
    return DTYPES[name]


def remat_name(value: str | bool, field: str = "config.model.remat") -> str:
    """A remat setting as a policy name; True / False (older configs) mean "full" / "none"."""
    if isinstance(value, bool):
        return "full" if value else "none"
    if value not in REMAT_POLICIES:
        raise KeyError(f"{field}={value!r}; valid: {sorted(REMAT_POLICIES)}")
    return value


def remat_policy(name: str):
    """The `jax.checkpoint` policy of a remat name (None for "none": no checkpointing at all)."""
    return REMAT_POLICIES[remat_name(name)]


def remat(module_cls, name: str, static_argnums: tuple[int, ...] = ()):
    """`module_cls` wrapped in `nn.remat` with the named policy; unchanged for "none". Parameter names are the
    same either way (checkpoints and released weights load into both)."""
    import flax.linen as nn

    name = remat_name(name)
    if name == "none":
        return module_cls
    return nn.remat(module_cls, policy=REMAT_POLICIES[name], static_argnums=static_argnums)


def cudnn_supports(compute_dtype, head_dim: int) -> bool:
    """Whether cuDNN's fused attention takes this call (jax.nn.dot_product_attention's cuDNN checks)."""
    return jnp.dtype(compute_dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) and (
        head_dim % 8 == 0 and head_dim <= 128
    )


def attention_implementation(
    name: str, compute_dtype, head_dim: int, backend: str | None = None, field: str = "config.model.attention"
) -> str:
    """The `implementation=` for jax.nn.dot_product_attention: "xla" or "cudnn" (see the module docstring)."""
    if name not in ATTENTION:
        raise KeyError(f"{field}={name!r}; valid: {list(ATTENTION)}")
    backend = backend or jax.default_backend()
    if name == "xla":
        return "xla"
    fits = cudnn_supports(compute_dtype, head_dim)
    if name == "cudnn":
        if backend != "gpu":
            raise ValueError(f"{field}='cudnn' needs a GPU; this run's backend is {backend} (use 'auto' or 'xla')")
        if not fits:
            raise ValueError(
                f"{field}='cudnn' needs bfloat16/float16 compute and a head size that is a multiple of 8 up to "
                f"128; this model computes in {jnp.dtype(compute_dtype).name} with heads of {head_dim}"
            )
        return "cudnn"
    return "cudnn" if backend == "gpu" and fits else "xla"


@functools.cache
def cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ("vendor_id", "model name", "flags", ...); {} elsewhere."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return info


def cpu_vendor() -> str:
    """The host CPU's vendor id ("GenuineIntel", "AuthenticAMD"); "" where it has none."""
    return cpuinfo().get("vendor_id", "")


def _env_choice(name: str, choices: tuple[str, ...]) -> str:
    """`$name` (default: the first choice), checked against `choices`; a bad value names the variable."""
    value = os.environ.get(name, choices[0])
    if value not in choices:
        raise ValueError(f"${name}={value!r}: use one of {', '.join(choices)}")
    return value


def conv_kernel_grad() -> str:
    """ "dots" or "xla": how wide conv kernels get their gradient on the CPU (module docstring)."""
    mode = _env_choice(CONV_KERNEL_GRAD_ENV, CONV_KERNEL_GRAD)
    if mode == "auto":
        return "dots" if cpu_vendor() in ("GenuineIntel", "AuthenticAMD") else "xla"
    return mode


def conv3x3() -> str:
    """ "winograd" or "xla": how wide float32 3x3 convs run on the CPU (module docstring)."""
    return _env_choice(CONV3X3_ENV, CONV3X3)


def host_malloc_choice(cpu: bool) -> str:
    """The policy `$DCAE_JAX_HOST_MALLOC` (module docstring) asks for in a process that computes on the CPU (`cpu`)
    or not: "reuse" or "system" ("system" also where the C library is not glibc: the policy is glibc's mallopt)."""
    import platform

    mode = _env_choice(HOST_MALLOC_ENV, HOST_MALLOC)
    if mode == "auto":
        mode = "reuse" if cpu and "glibc.malloc." not in os.environ.get("GLIBC_TUNABLES", "") else "system"
    return "system" if mode == "reuse" and platform.libc_ver()[0] != "glibc" else mode


def set_host_malloc(cpu: bool) -> str:
    """Applies `host_malloc_choice(cpu)` to this process; returns the policy in force, "reuse" or "system"."""
    global _host_malloc
    if host_malloc_choice(cpu) == "reuse" and _host_malloc != "reuse":
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
        ok = mallopt(_M_ARENA_MAX, 1) and mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, -1)
        _host_malloc = "reuse" if ok else _host_malloc
    return _host_malloc


def host_malloc() -> str:
    """The host allocator policy `set_host_malloc` put in force in this process ("system" if it never ran)."""
    return _host_malloc
