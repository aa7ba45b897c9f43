"""Tiny random-weight SDXL-inpaint and Flux Fill pipelines, saved as real diffusers folders.

They have the real component classes (UNet2DConditionModel with 9 input channels, AutoencoderKL,
the CLIP text encoders, FluxTransformer2DModel, T5EncoderModel) at a few hundred kB each, so the
same ``from_pretrained`` + pipeline call that runs the published weights runs on them in tests.
Tokenizers are built in memory: a CLIP BPE over the 256 byte symbols (no merges) and a T5
unigram over printable ASCII. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

from appliance.tools.image_gen.diffusers_inpaint import quiet_progress

TINY_RESOLUTION = 64
TINY_SETTINGS = {"resolution": TINY_RESOLUTION, "steps": 2, "max_sequence_length": 32,
                 "max_batch": 4}
CLIP_MAX_LENGTH = 32


def clip_tokenizer():
    """A CLIP tokenizer whose vocabulary is the 256 byte symbols and their word-final forms."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    symbols = sorted(ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for symbol in symbols:
        vocab[symbol] = len(vocab)
    for symbol in symbols:
        vocab[symbol + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_MAX_LENGTH)


def t5_tokenizer():
    """A T5 (unigram) tokenizer over printable ASCII, lower-case words get a "▁x" piece."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(chr(c), -3.0) for c in range(32, 127)]
    pieces += [("\u2581" + chr(c), -2.5) for c in range(97, 123)]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def _clip_config(vocab_size: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=37,
                          num_attention_heads=4, num_hidden_layers=2, projection_dim=32,
                          max_position_embeddings=CLIP_MAX_LENGTH, hidden_act="gelu",
                          bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=1)


def _vae(flux: bool):
    from diffusers import AutoencoderKL

    extra = dict(use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
                 scaling_factor=1.5035) if flux else {}
    return AutoencoderKL(block_out_channels=[16, 32], in_channels=3, out_channels=3,
                         down_block_types=["DownEncoderBlock2D"] * 2,
                         up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4,
                         sample_size=TINY_RESOLUTION, norm_num_groups=8, **extra)


def build_tiny_sdxl_inpaint(folder: Path, seed: int = 0) -> Path:
    """Write a StableDiffusionXLInpaintPipeline folder with random weights."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLInpaintPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    quiet_progress()
    torch.manual_seed(seed)
    tokenizer = clip_tokenizer()
    text_config = _clip_config(len(tokenizer))
    # SDXL's added conditioning: pooled text (32) + 6 time ids x 8 = 80 input features.
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=TINY_RESOLUTION // 2,
        in_channels=9, out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=8)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                       beta_schedule="scaled_linear", timestep_spacing="leading")
    pipeline = StableDiffusionXLInpaintPipeline(
        vae=_vae(flux=False), text_encoder=CLIPTextModel(text_config),
        text_encoder_2=CLIPTextModelWithProjection(text_config), tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=unet, scheduler=scheduler, requires_aesthetics_score=False,
        force_zeros_for_empty_prompt=True)
    folder = Path(folder)
    pipeline.save_pretrained(folder)
    return folder


def build_tiny_flux_fill(folder: Path, seed: int = 0) -> Path:
    """Write a FluxFillPipeline folder with random weights."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxFillPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    quiet_progress()
    torch.manual_seed(seed)
    tokenizer = clip_tokenizer()
    t5_tok = t5_tokenizer()
    # Fill input = packed noise latents (4 ch x 2x2 = 16) + packed masked-image latents (16)
    # + the mask at latent resolution (vae factor 2 -> 2x2 = 4 ch, packed 2x2 = 16) = 48.
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=48, out_channels=16, num_layers=1, num_single_layers=1,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
        pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                 num_heads=4, relative_attention_num_buckets=8,
                                 is_encoder_decoder=False, use_cache=False, pad_token_id=0,
                                 eos_token_id=1, decoder_start_token_id=0))
    pipeline = FluxFillPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(flux=True),
                                text_encoder=CLIPTextModel(_clip_config(len(tokenizer))),
                                tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=t5_tok,
                                transformer=transformer)
    folder = Path(folder)
    pipeline.save_pretrained(folder)
    return folder
