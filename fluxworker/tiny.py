"""Tiny random models in the real on-disk formats, written offline in seconds.

The FLUX folder is a real diffusers pipeline folder (``model_index.json``, one subfolder per
component, safetensors weights, both tokenizers), loaded by the same ``from_pretrained`` call as
the real FLUX.1-schnell. The Real-ESRGAN file is an RRDBNet in the layout and ``params_ema``
wrapper of ``RealESRGAN_x4plus.pth``, only narrower and with one block. Their images are noise,
but every code path runs for real. Tests, the demo and the benchmarks use these models;
``DIR/config.yaml`` is a working config that points at them.

LaMa's architecture is fixed (51 M parameters, about 205 MB in any format), too big to write by
default: :func:`write_random_lama` writes one with random weights where a test or a benchmark
needs it, and ``fluxworker tiny-models --with-lama`` adds one to the tiny models.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

# The tiny tokenizers have one token per character, where the real ones have about one per word:
# CLIP's 77 positions would cut most prompts short (with a warning per job), so the tiny CLIP has
# room for about as much text as the real one takes.
_CLIP_MAX_LENGTH = 320
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


def tokenizers():
    """The byte-level CLIP and T5 tokenizers of the tiny model, built in memory: (clip, t5)."""
    return _clip_tokenizer(), _t5_tokenizer()


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


def build_esrgan_state_dict(num_feat: int = 16, num_block: int = 1, num_grow_ch: int = 32, seed: int = 0) -> dict:
    """A random RRDBNet x4 state dict with the key names of ``RealESRGAN_x4plus.pth``.

    The real file has num_feat=64, num_block=23; num_grow_ch must stay 32, which is what spandrel
    assumes. The residual blocks start small and the last layer is biased to mid-grey, as trained
    networks are, so outputs follow the input instead of clipping to black or white.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    state: dict = {}

    def conv(name: str, cin: int, cout: int, gain: float = 1.0, bias: float = 0.0) -> None:
        bound = gain * (6 / (cin * 9)) ** 0.5  # He-uniform
        state[f"{name}.weight"] = (torch.rand(cout, cin, 3, 3, generator=generator) * 2 - 1) * bound
        state[f"{name}.bias"] = torch.full((cout,), bias)

    conv("conv_first", 3, num_feat)
    for block in range(num_block):
        for rdb in (1, 2, 3):
            for n in range(1, 6):
                cout = num_grow_ch if n < 5 else num_feat
                conv(f"body.{block}.rdb{rdb}.conv{n}", num_feat + (n - 1) * num_grow_ch, cout, gain=0.1)
    for name in ("conv_body", "conv_up1", "conv_up2", "conv_hr"):
        conv(name, num_feat, num_feat)
    conv("conv_last", num_feat, 3, gain=0.2, bias=0.5)
    return state


def write_esrgan(path: str | os.PathLike, **sizes) -> Path:
    """Write a random Real-ESRGAN x4 file in the ``{"params_ema": state_dict}`` format."""
    import torch

    path = Path(path)
    torch.save({"params_ema": build_esrgan_state_dict(**sizes)}, path)
    return path


def write_random_lama(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write a LaMa model with random weights; the suffix picks the format: ``.pt`` (TorchScript,
    as ``big-lama.pt``), ``.pth`` (a pickled state dict) or ``.safetensors``."""
    import warnings

    import torch
    from spandrel.architectures.LaMa import LaMa

    path = Path(path)
    torch.manual_seed(seed)
    model = LaMa(in_nc=4, out_nc=3).eval()
    if path.suffix == ".pt":
        example = (torch.rand(1, 3, 64, 64), torch.zeros(1, 1, 64, 64))
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracing is deprecated in torch, yet it is the file's format
            torch.jit.trace(model, example, check_trace=False).save(str(path))
    elif path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({key: value.contiguous() for key, value in model.state_dict().items()}, str(path))
    else:
        torch.save(model.state_dict(), path)
    return path


def tiny_config(root: Path) -> dict:
    """A complete config that serves the tiny models from ``root``."""
    return {
        "paths": {"inbox": "inbox", "outputs": "outputs"},
        "models": {"flux": "./flux", "esrgan": "./esrgan.pth", "lama": None, "device": "cpu", "dtype": "float32"},
        "limits": {"max_width": 1024, "max_height": 1024},
        "inbox": {"scan_interval": 2.0, "settle_seconds": 10.0},
        "worker": {"stop_timeout": 60.0},
        "http": {"host": "127.0.0.1", "port": 8000},
    }


def write_tiny_models(root: str | os.PathLike, *, seed: int = 0, with_lama: bool = False) -> Path:
    """Write the tiny models and ``root/config.yaml``; return the config's path. ``with_lama`` adds
    a LaMa with random weights (``root/lama.safetensors``, about 205 MB) and configures it."""
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    build_tiny_flux(seed).save_pretrained(root / "flux", safe_serialization=True)
    write_esrgan(root / "esrgan.pth", seed=seed)
    for folder in ("inbox", "outputs"):
        (root / folder).mkdir(exist_ok=True)
    header = "# Tiny random models for tests and the demo: written by `fluxworker tiny-models`.\n"
    data = tiny_config(root)
    if with_lama:
        write_random_lama(root / "lama.safetensors", seed=seed)
        data["models"]["lama"] = "./lama.safetensors"
        header += "# models.lama is a LaMa with random weights (--with-lama): it erases with noise.\n"
    else:
        header += ("# models.lama is null: LaMa (about 205 MB) is not written here; point it at big-lama.pt "
                   "to erase,\n# or write a random one with `fluxworker tiny-models DIR --with-lama`.\n")
    return write_config(root, data, header=header)


def write_config(folder: Path, data: dict, *, header: str = "", **sections: dict) -> Path:
    """Write ``folder/config.yaml`` from ``data``, each of ``sections`` updating the section of that
    name; return its path."""
    data = {name: dict(values) if isinstance(values, dict) else values for name, values in data.items()}
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(header + yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path
