"""Tiny random models in the real on-disk formats, written offline in seconds.

The FLUX folder is a real diffusers pipeline folder (``model_index.json``, one subfolder per
component, safetensors weights, both tokenizers), loaded by the same ``from_pretrained`` call as
the real FLUX.1-schnell. Its images are noise, but every code path runs for real. Tests, the demo
and the benchmarks use these models; ``DIR/config.yaml`` is a working config that points at them.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

_CLIP_MAX_LENGTH = 77
_T5_MAX_LENGTH = 512


def _byte_chars() -> list[str]:
    """The 256 printable stand-ins that byte-level BPE uses for the bytes 0..255 (GPT-2's table)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for byte in range(256):
        if byte in keep:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def _clip_tokenizer():
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    for char in _byte_chars():
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=_CLIP_MAX_LENGTH)


def _t5_tokenizer():
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    printable = [chr(c) for c in range(33, 127)]
    pieces += [(char, -3.0) for char in printable]
    pieces += [("▁" + char, -2.5) for char in printable]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=_T5_MAX_LENGTH)


def build_tiny_flux(seed: int = 0):
    """A FluxPipeline of the real architecture at toy sizes, with random weights."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    clip_tokenizer = _clip_tokenizer()
    t5_tokenizer = _t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=False,
        axes_dims_rope=(4, 4, 8),
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[16] * 4, layers_per_block=1, latent_channels=16, norm_num_groups=4,
        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159,
    )
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=_CLIP_MAX_LENGTH, projection_dim=32,
        hidden_act="quick_gelu", bos_token_id=clip_tokenizer.bos_token_id,
        eos_token_id=clip_tokenizer.eos_token_id, pad_token_id=clip_tokenizer.pad_token_id,
    ))
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tokenizer), d_model=32, d_ff=64, d_kv=16, num_layers=2, num_heads=2,
        feed_forward_proj="gated-gelu", pad_token_id=t5_tokenizer.pad_token_id,
        eos_token_id=t5_tokenizer.eos_token_id, decoder_start_token_id=t5_tokenizer.pad_token_id,
    ))
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tokenizer,
        text_encoder_2=t5, tokenizer_2=t5_tokenizer, transformer=transformer,
    )


def tiny_config(root: Path) -> dict:
    """A complete config that serves the tiny models from ``root``."""
    return {
        "paths": {"inbox": "inbox", "outputs": "outputs"},
        "models": {"flux": "./flux", "device": "cpu", "dtype": "float32"},
        "limits": {"max_width": 1024, "max_height": 1024},
        "inbox": {"scan_interval": 2.0, "settle_seconds": 10.0},
        "worker": {"stop_timeout": 60.0},
        "http": {"host": "127.0.0.1", "port": 8000},
    }


def write_tiny_models(root: str | os.PathLike, *, seed: int = 0) -> Path:
    """Write the tiny models and ``root/config.yaml``; return the config's path."""
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    build_tiny_flux(seed).save_pretrained(root / "flux", safe_serialization=True)
    for folder in ("inbox", "outputs"):
        (root / folder).mkdir(exist_ok=True)
    config = root / "config.yaml"
    header = "# Tiny random models for tests and the demo: written by `fluxworker tiny-models`.\n"
    config.write_text(header + yaml.safe_dump(tiny_config(root), sort_keys=False), encoding="utf-8")
    return config
