"""FLUX.1-schnell's architecture with random weights, built straight on the target device.

``full`` is the published configuration (transformer 11.9 B parameters, T5-XXL encoder 4.76 B,
CLIP-L 0.12 B, the 16-channel VAE) with the real vocabulary sizes; speed does not depend on the
weights' values. ``tiny`` has the same structure at toy sizes, with enough blocks that balanced
mode streams some and keeps others. The tokenizers are the project's tiny byte-level ones: their
ids fit in the real vocabularies, and prompts tokenize to the same padded lengths.
"""

from __future__ import annotations

import torch

CLIP_POSITIONS = 77  # FLUX.1-schnell's CLIP text encoder
FULL = {
    "transformer": dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                        guidance_embeds=False, axes_dims_rope=(16, 56, 56)),
    "t5": dict(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
               relative_attention_num_buckets=32, relative_attention_max_distance=128, layer_norm_epsilon=1e-6),
    "clip": dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                 num_hidden_layers=12, projection_dim=768),
    "vae": [128, 256, 512, 512],
    "vae_groups": 32,
}
TINY = {
    "transformer": dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=16,
                        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                        guidance_embeds=False, axes_dims_rope=(4, 4, 8)),
    "t5": dict(vocab_size=32128, d_model=32, d_ff=64, d_kv=16, num_heads=2, num_layers=3),
    "clip": dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                 num_hidden_layers=2, projection_dim=32),
    "vae": [16, 16, 16, 16],
    "vae_groups": 4,
}


def build_flux(size: str, device: str, dtype, seed: int = 0):
    """A FluxPipeline of the ``full`` or ``tiny`` architecture, its weights random and created on
    ``device`` in ``dtype``, every module in eval mode."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from fluxworker.tiny import tokenizers

    sizes = FULL if size == "full" else TINY
    clip_tokenizer, t5_tokenizer = tokenizers()
    clip_tokenizer.model_max_length = CLIP_POSITIONS  # the real CLIP's; timing does not depend on it
    torch.manual_seed(seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            transformer = FluxTransformer2DModel(**sizes["transformer"])
            t5 = T5EncoderModel(T5Config(
                **sizes["t5"], feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                pad_token_id=t5_tokenizer.pad_token_id, eos_token_id=t5_tokenizer.eos_token_id,
                decoder_start_token_id=t5_tokenizer.pad_token_id,
            ))
            clip = CLIPTextModel(CLIPTextConfig(
                **sizes["clip"], max_position_embeddings=CLIP_POSITIONS, hidden_act="quick_gelu",
                bos_token_id=clip_tokenizer.bos_token_id, eos_token_id=clip_tokenizer.eos_token_id,
                pad_token_id=clip_tokenizer.pad_token_id,
            ))
            vae = AutoencoderKL(
                in_channels=3, out_channels=3, latent_channels=16, block_out_channels=sizes["vae"],
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                layers_per_block=2, norm_num_groups=sizes["vae_groups"], scaling_factor=0.3611,
                shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True,
            )
    finally:
        torch.set_default_dtype(default_dtype)
    for module in (transformer, t5, clip, vae):
        module.eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tokenizer,
                        text_encoder_2=t5, tokenizer_2=t5_tokenizer, transformer=transformer)
