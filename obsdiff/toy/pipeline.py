"""The toy SD3 pipeline: the classes of Stable Diffusion 3 at a size a CPU trains in minutes.

MMDiT denoiser (`SD3Transformer2DModel`, 6 heads per block so structured pruning removes whole
heads), flow-matching Euler scheduler, a small `AutoencoderKL` (32 x 32 pixels <-> 4 x 16 x 16
latents), two CLIP text encoders with projection and a word-level tokenizer of the caption
vocabulary; no T5 (SD3 pads its slot with zeros). `build_pipeline` makes it untrained from a
seed; `obsdiff.toy.train` trains it and saves it under obsdiff/data/toy/pipeline.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, PreTrainedTokenizerFast

from obsdiff.toy.data import ATTRIBUTES, IMAGE_SIZE


PIPELINE_DIR = Path(__file__).resolve().parents[1] / "data" / "toy" / "pipeline"
TOKEN_LENGTH = 16  # "a small red circle in the top left on a black background" + bos/eos = 14
TEXT_WIDTH = 64
HEADS, HEAD_DIM, LAYERS = 6, 16, 6
LATENT_CHANNELS = 4
SPECIALS = ("<|startoftext|>", "<|endoftext|>", "<unk>")


def caption_words() -> list[str]:
    """Every word a toy caption can use."""
    words = {"a", "in", "the", "on", "background"}
    for values in ATTRIBUTES.values():
        for value in values:
            words.update(value.split())
    return sorted(words)


def word_tokenizer() -> PreTrainedTokenizerFast:
    """One token per caption word, <|startoftext|> ... <|endoftext|>, padded with <|endoftext|>
    (as CLIP: the pooled output is read at the first end token)."""
    vocab = {token: i for i, token in enumerate([*SPECIALS, *caption_words()])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    bos, eos = SPECIALS[0], SPECIALS[1]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        pad_token=eos,
        unk_token="<unk>",
        model_max_length=TOKEN_LENGTH,
    )


def text_encoder(vocab_size: int) -> CLIPTextModelWithProjection:
    config = CLIPTextConfig(
        hidden_size=TEXT_WIDTH,
        intermediate_size=2 * TEXT_WIDTH,
        num_attention_heads=4,
        num_hidden_layers=3,
        vocab_size=vocab_size,
        max_position_embeddings=TOKEN_LENGTH,
        projection_dim=TEXT_WIDTH,
        hidden_act="gelu",
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModelWithProjection(config)


def vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        mid_block_add_attention=False,
        sample_size=IMAGE_SIZE,
        scaling_factor=1.0,  # set from the latents' statistics after training
        shift_factor=0.0,
    )


def transformer() -> SD3Transformer2DModel:
    return SD3Transformer2DModel(
        sample_size=IMAGE_SIZE // 2,
        patch_size=2,
        in_channels=LATENT_CHANNELS,
        num_layers=LAYERS,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        joint_attention_dim=2 * TEXT_WIDTH,  # the two CLIP encoders' hidden states, concatenated
        caption_projection_dim=HEADS * HEAD_DIM,
        pooled_projection_dim=2 * TEXT_WIDTH,
        out_channels=LATENT_CHANNELS,
        pos_embed_max_size=IMAGE_SIZE // 4,
    )


def build_pipeline(seed: int = 0) -> StableDiffusion3Pipeline:
    """The untrained toy pipeline, its weights drawn from `seed`."""
    torch.manual_seed(seed)
    tokenizer = word_tokenizer()
    return StableDiffusion3Pipeline(
        transformer=transformer(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
        vae=vae(),
        text_encoder=text_encoder(len(tokenizer)),
        tokenizer=tokenizer,
        text_encoder_2=text_encoder(len(tokenizer)),
        tokenizer_2=word_tokenizer(),
        text_encoder_3=None,
        tokenizer_3=None,
    )
