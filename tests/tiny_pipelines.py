"""Tiny random SD v1.5-, SDXL- and SD3.5-shaped diffusers pipelines, saved with `save_pretrained`, so that the
text-to-image scripts load them exactly as they load the real models (nothing is downloaded).

Shapes follow the real models at a small scale: SD v1.5 = one CLIP text encoder (last hidden state, 32-d),
cross-attention blocks and a cross-attention mid block; SDXL = two CLIP text encoders (penultimate states of
both, concatenated: 64-d; pooled projection of the second: 32-d) and `text_time` added conditioning. The VAE
downsamples 4x, so 32 px images are 8x8 latents and the UNet bottleneck is 4x4."""

from __future__ import annotations

import json
from pathlib import Path

import torch

LETTERS = "abcdefghijklmnopqrstuvwxyz0123456789"
MAX_LENGTH = 16  # tokens per prompt (77 in the real models)


def write_tokenizer_files(folder: Path) -> Path:
    """A character-level CLIP BPE vocabulary (vocab.json, merges.txt) with a couple of merges."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in LETTERS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    merges = ["t h", "th e</w>", "a n", "an d</w>"]
    for m in merges:
        vocab.setdefault(m.replace(" ", ""), len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


def _tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(write_tokenizer_files(folder)), model_max_length=MAX_LENGTH)


def _text_config(vocab_size: int, **kw):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=MAX_LENGTH, bos_token_id=0, eos_token_id=1,
                          pad_token_id=1, **kw)


def _vae(scaling_factor: float, latent_channels: int = 4, **kw):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(8, 8, 16),
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                         layers_per_block=1, norm_num_groups=8, sample_size=32, scaling_factor=scaling_factor, **kw)


def _scheduler(cls_name: str):
    import diffusers

    extra = {"skip_prk_steps": True} if cls_name == "PNDMScheduler" else {}
    return getattr(diffusers, cls_name)(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                        beta_schedule="scaled_linear", steps_offset=1, **extra)


def tiny_sd15(path: str | Path, seed: int = 0) -> Path:
    """An SD v1.5-shaped pipeline (StableDiffusionPipeline) saved to `path`."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    path = Path(path)
    torch.manual_seed(seed)
    tok = _tokenizer(path.with_name(path.name + "-vocab"))
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=32)
    pipe = StableDiffusionPipeline(vae=_vae(0.18215), text_encoder=CLIPTextModel(_text_config(len(tok))),
                                   tokenizer=tok, unet=unet, scheduler=_scheduler("PNDMScheduler"),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(path))
    return path


def tiny_sdxl(path: str | Path, seed: int = 0) -> Path:
    """An SDXL-shaped pipeline (StableDiffusionXLPipeline) saved to `path`."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    path = Path(path)
    torch.manual_seed(seed)
    tok = _tokenizer(path.with_name(path.name + "-vocab"))
    time_dim, pooled_dim = 8, 32
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
                                transformer_layers_per_block=(1, 2), attention_head_dim=(4, 8),
                                use_linear_projection=True, addition_embed_type="text_time",
                                addition_time_embed_dim=time_dim, projection_class_embeddings_input_dim=6 * time_dim
                                + pooled_dim, norm_num_groups=32)
    pipe = StableDiffusionXLPipeline(
        vae=_vae(0.13025), text_encoder=CLIPTextModel(_text_config(len(tok))),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(len(tok), projection_dim=pooled_dim)),
        tokenizer=tok, tokenizer_2=tok, unet=unet, scheduler=_scheduler("EulerDiscreteScheduler"))
    pipe.save_pretrained(str(path))
    return path


def tiny_t5(path: Path):
    """A tiny T5 encoder (80-d, SD3's joint text width here) and a Unigram T5 tokenizer of a few words."""
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    words = ["<pad>", "</s>", "<unk>", *("\u2581" + w for w in "a cat the dog and red car blue sky photo".split()),
             *LETTERS]
    T5TokenizerFast(vocab=[(w, -float(i)) for i, w in enumerate(words)], extra_ids=0).save_pretrained(str(path))
    tok = T5TokenizerFast.from_pretrained(str(path))
    return tok, T5EncoderModel(T5Config(vocab_size=len(tok), d_model=80, d_ff=64, d_kv=16, num_heads=2, num_layers=2))


def tiny_sd3(path: str | Path, seed: int = 0, shift: float = 3.0, t5: bool = False) -> Path:
    """An SD3.5-shaped pipeline (StableDiffusion3Pipeline) saved to `path`, without T5 (as diffusers allows) unless
    `t5`: two CLIP text encoders with projections (pooled 32 + 32), a joint text width of 80 (wider than the CLIPs'
    64, so the padding is exercised), an MMDiT with SD3.5 Medium's dual attention and RMS qk-norm, a VAE with 8
    latent channels and SD3's shift and scale, and the flow-matching scheduler with a timestep shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    path = Path(path)
    torch.manual_seed(seed)
    tok = _tokenizer(path.with_name(path.name + "-vocab"))
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=8, out_channels=8, num_layers=4,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=80,
                                        caption_projection_dim=16, pooled_projection_dim=64, pos_embed_max_size=8,
                                        dual_attention_layers=(0,), qk_norm="rms_norm")
    encoders = [CLIPTextModelWithProjection(_text_config(len(tok), projection_dim=32)) for _ in range(2)]
    tok3, enc3 = tiny_t5(path.with_name(path.name + "-t5")) if t5 else (None, None)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, vae=_vae(1.5305, 8, shift_factor=0.0609, use_quant_conv=False,
                                          use_post_quant_conv=False),
        text_encoder=encoders[0], text_encoder_2=encoders[1], text_encoder_3=enc3, tokenizer=tok, tokenizer_2=tok,
        tokenizer_3=tok3, scheduler=FlowMatchEulerDiscreteScheduler(shift=shift))
    pipe.save_pretrained(str(path))
    return path


def write_image_folder(folder: str | Path, n: int, size: int = 32, seed: int = 0) -> Path:
    """n random RGB PNGs with same-named .txt captions (the folder form of --real-images)."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        pixels = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i:05d}.png")
        (folder / f"{i:05d}.txt").write_text(f"a photo number {i}")
    return folder
