"""Speed-ups applied to FLUX's modules once, at load.

Kept bfloat16 numerics (on by default where they apply):
- fused q/k/v projections: one matrix product instead of three in every attention; the separate
  weights are dropped afterwards, so fusing adds no memory;
- the VAE's convolutions in channels_last, the layout the GPU's convolution kernels prefer;
- the attention kernel (``performance.attention``; ``sdpa`` leaves the choice to PyTorch).

Off by default:
- float8 storage of the transformer's weights (``performance.fp8_storage``), each layer cast back
  to the compute dtype as it runs: half the weight memory, different images;
- compilation of the transformer's repeated blocks (``performance.compile``), with the compiled
  kernels kept on disk so that a restart reuses them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

ATTENTION_BACKENDS = {"sdpa": "native", "cudnn": "_native_cudnn", "flash": "_native_flash",
                      "efficient": "_native_efficient"}
_UNFUSED = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")


def fuse_qkv(transformer) -> int:
    """Fuse every attention's projections; returns how many attentions were fused."""
    from diffusers.models.attention import AttentionModuleMixin

    fused = 0
    with torch.no_grad():
        for module in list(transformer.modules()):
            if not isinstance(module, AttentionModuleMixin) or not module._supports_qkv_fusion:
                continue
            if module.fused_projections:
                continue
            module.fuse_projections()
            for name in _UNFUSED:  # the fused path never reads them again
                if name in module._modules:
                    delattr(module, name)
            fused += 1
    return fused


def set_attention(transformer, name: str) -> None:
    """Use the attention kernel ``name`` (a key of ATTENTION_BACKENDS) in every attention."""
    from diffusers.utils import logging as dlogging

    verbosity = dlogging.get_verbosity()
    dlogging.set_verbosity_error()  # diffusers warns that backends are experimental on every call
    try:
        transformer.set_attention_backend(ATTENTION_BACKENDS[name])
    finally:
        dlogging.set_verbosity(verbosity)


def store_in_fp8(transformer, compute_dtype) -> None:
    """Keep the transformer's linear weights in float8 (e4m3) and cast each to ``compute_dtype`` as it
    runs. Norms and embeddings keep their dtype. Irreversible: the original weights are gone."""
    transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype)


def apply(pipe, performance, device: str, dtype) -> list[str]:
    """Apply the configured load-time speed-ups; returns their names, for the log."""
    applied = []
    if performance.fuse_qkv:
        applied.append(f"fused qkv ({fuse_qkv(pipe.transformer)} attentions)")
    if performance.fp8_storage:
        store_in_fp8(pipe.transformer, dtype)
        applied.append("fp8 storage")
    if performance.vae_channels_last:
        pipe.vae.to(memory_format=torch.channels_last)
        applied.append("VAE channels_last")
    if performance.attention != "sdpa":
        if device == "cuda":
            set_attention(pipe.transformer, performance.attention)
            applied.append(f"{performance.attention} attention")
        else:
            log.warning("performance.attention %s applies on CUDA only: using sdpa", performance.attention)
    return applied


def use_compile_cache(folder: Path | None) -> str:
    """Keep compiled graphs and kernels on disk in ``folder`` (or $TORCHINDUCTOR_CACHE_DIR), so a
    restart loads them instead of compiling again. Returns the folder in use."""
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    if hasattr(functorch_config, "enable_autograd_cache"):
        functorch_config.enable_autograd_cache = True
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir
    except ImportError:  # older PyTorch: the variable alone decides
        return os.environ.get("TORCHINDUCTOR_CACHE_DIR", "PyTorch's default")
    return cache_dir()


def compile_blocks(transformer, *, backend: str = "inductor") -> None:
    """Compile each of the transformer's repeated blocks (one graph serves all blocks of a kind)."""
    transformer.compile_repeated_blocks(fullgraph=True, backend=backend)


def uncompile_blocks(transformer) -> None:
    """Undo :func:`compile_blocks`: the blocks run eagerly again and compiled graphs are dropped."""
    for module in transformer.modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None
    torch._dynamo.reset()
