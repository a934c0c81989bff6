"""The tiny offline zoo: random-weight pipelines of every supported family, built in code.

Same diffusers classes and module names as the real checkpoints, a few hundred thousand
parameters each, tokenizers built from in-memory vocabularies (nothing is fetched), deterministic
from a seed and returned in eval mode. They exercise every code path of obsdiff on a CPU in well
under a second; they are the test fixtures and the demo models. Sizes are chosen to keep the
real models' coupling rules (e.g. SD3's joint attention width >= the two CLIP widths together).
"""

from __future__ import annotations

import re
import string
from typing import Any

import tokenizers
import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLFlux2,
    AutoencoderKLQwenImage,
    AutoencoderKLWan,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    Flux2Pipeline,
    Flux2Transformer2DModel,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    PNDMScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
)
from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE as FLUX2_SYSTEM_MESSAGE
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    PixtralImageProcessor,
    PixtralProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
    UMT5Config,
    UMT5EncoderModel,
)

from obsdiff.models.loading import set_eval_mode


CLIP_MAX_LENGTH = 77  # as the real CLIP tokenizers; the pipelines assume it
CLIP_VOCAB_SIZE = 514  # 2 specials + 2 x 256 byte-level characters (see `char_clip_tokenizer`)
TEXT_WIDTH = 32  # hidden size of the tiny CLIP text encoders


# --------------------------------------------------------------------------- tokenizers
def char_clip_tokenizer() -> CLIPTokenizer:
    """Byte-level BPE with no merges: one token per character, 514 ids, no files."""
    chars = sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab.update({c: i + 2 for i, c in enumerate(chars)})
    vocab.update({c + "</w>": i + 2 + len(chars) for i, c in enumerate(chars)})
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_MAX_LENGTH)


def char_t5_tokenizer(max_length: int = CLIP_MAX_LENGTH) -> T5Tokenizer:
    """Unigram pieces for letters, digits and punctuation; <pad>=0, </s>=1, <unk>=2 as in T5
    (and UMT5); `max_length` tokens at most."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    for ch in string.ascii_letters + string.digits + ".,!?'-":
        pieces += [(ch, -5.0), ("\u2581" + ch, -4.0)]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


# --------------------------------------------------------------------------- encoders, VAE
def clip_text_config(**overrides: Any) -> CLIPTextConfig:
    """The tiny CLIP text tower (32 wide, the character tokenizer's vocabulary), shared by the
    tiny pipelines' text encoders and the tiny CLIP score model; `overrides` change fields."""
    fields: dict[str, Any] = {
        "hidden_size": TEXT_WIDTH,
        "intermediate_size": 37,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "vocab_size": CLIP_VOCAB_SIZE,
        "max_position_embeddings": CLIP_MAX_LENGTH,
        "projection_dim": TEXT_WIDTH,
        "hidden_act": "gelu",
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 1,
    }
    return CLIPTextConfig(**(fields | overrides))


def tiny_clip_text_encoder(with_projection: bool) -> CLIPTextModel | CLIPTextModelWithProjection:
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(clip_text_config())


def tiny_t5_encoder(d_model: int) -> T5EncoderModel:
    return T5EncoderModel(
        T5Config(
            vocab_size=200,
            d_model=d_model,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
        )
    )


def tiny_vae(scaling_factor: float, shift_factor: float | None, quant_conv: bool) -> AutoencoderKL:
    """Two-level VAE, 4 latent channels, spatial factor 2."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=quant_conv,
        use_post_quant_conv=quant_conv,
    )


# --------------------------------------------------------------------------- pipelines
def tiny_sd3_pipeline(
    seed: int = 0, with_t5: bool = True, sd35: bool = False
) -> StableDiffusion3Pipeline:
    """SD3-Medium in miniature: 4 MMDiT blocks of 4 heads x 8, the last one `context_pre_only`.

    `sd35=True` adds the SD3.5-Medium extras: RMS qk-norm everywhere and dual-attention
    (`attn2`) in the first two blocks.
    """
    torch.manual_seed(seed)
    joint_width = 2 * TEXT_WIDTH  # CLIP-L + CLIP-G widths, zero-padded to the T5 width
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=4,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=joint_width,
        pooled_projection_dim=2 * TEXT_WIDTH,
        pos_embed_max_size=32,
        qk_norm="rms_norm" if sd35 else None,
        dual_attention_layers=(0, 1) if sd35 else (),
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(scaling_factor=1.5305, shift_factor=0.0609, quant_conv=False),
        text_encoder=tiny_clip_text_encoder(with_projection=True),
        tokenizer=char_clip_tokenizer(),
        text_encoder_2=tiny_clip_text_encoder(with_projection=True),
        tokenizer_2=char_clip_tokenizer(),
        text_encoder_3=tiny_t5_encoder(d_model=joint_width) if with_t5 else None,
        tokenizer_3=char_t5_tokenizer() if with_t5 else None,
    )
    return set_eval_mode(pipe)


def tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = True) -> FluxPipeline:
    """FLUX.1 in miniature: 2 double-stream and 2 single-stream blocks of 2 heads x 16.

    `guidance_embeds=True` is FLUX.1-dev (guidance-distilled); False is FLUX.1-schnell.
    """
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 VAE latent channels packed 2 x 2
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_WIDTH,  # T5 width
        pooled_projection_dim=TEXT_WIDTH,  # CLIP pooled width
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 4, 8),  # sums to attention_head_dim
    )
    if guidance_embeds:
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    pipe = FluxPipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=tiny_vae(scaling_factor=0.3611, shift_factor=0.1159, quant_conv=False),
        text_encoder=tiny_clip_text_encoder(with_projection=False),
        tokenizer=char_clip_tokenizer(),
        text_encoder_2=tiny_t5_encoder(d_model=TEXT_WIDTH),
        tokenizer_2=char_t5_tokenizer(),
    )
    return set_eval_mode(pipe)


def tiny_unet(**family: Any) -> UNet2DConditionModel:
    """A two-level UNet whose cross-attention levels hold 1 and 2 BasicTransformerBlocks;
    `family`: the block types, projections and conditioning of SDXL, SD 2.1 or SD 1.5."""
    return UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        attention_head_dim=(2, 4),  # diffusers' UNet name for the number of heads
        transformer_layers_per_block=(1, 2),
        norm_num_groups=4,
        **family,
    )


def tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """SDXL in miniature: a two-level UNet whose cross-attention level holds 1 and 2
    BasicTransformerBlocks (linear projections, GEGLU FFNs) and `text_time` added conditioning."""
    torch.manual_seed(seed)
    time_embed_dim = 8
    unet = tiny_unet(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + TEXT_WIDTH,
        cross_attention_dim=2 * TEXT_WIDTH,  # both CLIP encoders' hidden states, concatenated
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
    )
    pipe = StableDiffusionXLPipeline(
        unet=unet,
        scheduler=scheduler,
        vae=tiny_vae(scaling_factor=0.13025, shift_factor=None, quant_conv=True),
        text_encoder=tiny_clip_text_encoder(with_projection=False),
        tokenizer=char_clip_tokenizer(),
        text_encoder_2=tiny_clip_text_encoder(with_projection=True),
        tokenizer_2=char_clip_tokenizer(),
    )
    return set_eval_mode(pipe)


def tiny_sd_pipeline(seed: int = 0, linear_projection: bool = True) -> StableDiffusionPipeline:
    """SD 2.1 (`linear_projection`: linear `proj_in`/`proj_out`) or SD 1.5 (1x1 convolutions)
    in miniature: a two-level UNet whose cross-attention levels hold 1 and 2
    BasicTransformerBlocks (GEGLU FFNs), one CLIP text encoder, the PNDM scheduler."""
    torch.manual_seed(seed)
    unet = tiny_unet(
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        use_linear_projection=linear_projection,
        cross_attention_dim=TEXT_WIDTH,
    )
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(scaling_factor=0.18215, shift_factor=None, quant_conv=True),
        text_encoder=tiny_clip_text_encoder(with_projection=False),
        tokenizer=char_clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return set_eval_mode(pipe)


def tiny_pixart_pipeline(seed: int = 0) -> PixArtSigmaPipeline:
    """PixArt-Sigma in miniature: 2 cross-attention DiT blocks of 2 heads x 8 with adaLN-single,
    a GELU FFN, a tiny T5 encoder, the DPM-Solver++ scheduler."""
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,  # the learned variance, as the real model
        num_layers=2,
        cross_attention_dim=16,
        caption_channels=TEXT_WIDTH,
        sample_size=32,
        patch_size=2,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        use_additional_conditions=False,
        interpolation_scale=1,
    )
    pipe = PixArtSigmaPipeline(
        tokenizer=char_t5_tokenizer(),
        text_encoder=tiny_t5_encoder(TEXT_WIDTH),
        vae=tiny_vae(scaling_factor=0.13025, shift_factor=None, quant_conv=True),
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )
    return set_eval_mode(pipe)


# --------------------------------------------------------------------------- Qwen-Image
QWEN_TEXT_WIDTH = 32  # hidden size of the tiny Qwen2.5-VL text model (= joint_attention_dim)
QWEN_LATENT_CHANNELS = 4  # z_dim of the tiny VAE (the real one: 16)

# As the pipeline (QwenImagePipeline.__init__, not in any config, so not changeable by files).
PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity,"
    " text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}"
    "<|im_end|>\n<|im_start|>assistant\n"
)
PROMPT_TEMPLATE_DROP = 34  # QwenImagePipeline.prompt_template_encode_start_idx

# The Qwen2.5 special tokens the pipeline's template uses, and the vision ones the VL config names.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",  # pad (and bos of the text config), as Qwen2.5-VL
    "<|im_start|>",
    "<|im_end|>",  # eos, as Qwen2.5-VL-Instruct
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen/Qwen-Image's scheduler config (its `scheduler/scheduler_config.json` as third-party copies
# of the repository give it): resolution-dependent exponential shift between 0.5 at 256 image
# tokens and 0.9 at 8192, last sigma stretched to 0.02.
QWEN_IMAGE_SCHEDULER = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 0.9,
    "base_image_seq_len": 256,
    "max_image_seq_len": 8192,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
    "invert_sigmas": False,
    "stochastic_sampling": False,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
}


# tokenizer
def _template_words() -> list[str]:
    """The template's pre-tokenized pieces (byte-level strings) between its special tokens."""
    pre_tokenizer = Qwen2Tokenizer(vocab={"<|endoftext|>": 0}).backend_tokenizer.pre_tokenizer
    specials = "|".join(re.escape(t) for t in QWEN_SPECIAL_TOKENS)
    text = PROMPT_TEMPLATE.replace("{}", "")
    words: list[str] = []
    for segment in re.split(specials, text):
        words += [piece for piece, _ in pre_tokenizer.pre_tokenize_str(segment)]
    return words


def qwen_tokenizer() -> Qwen2Tokenizer:
    """Qwen2's byte-level BPE with one token per byte character, the prompt template's words as
    whole tokens (a left-to-right merge chain each) and Qwen2.5-VL's special tokens; no files."""
    chars = sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars)}
    merges: list[tuple[str, str]] = []
    for word in _template_words():
        for k in range(1, len(word)):
            left, right = word[:k], word[k]
            if word[: k + 1] not in vocab:
                vocab[word[: k + 1]] = len(vocab)
                merges.append((left, right))
    for token in QWEN_SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,  # type: ignore[arg-type]  # tokenizers' BPE takes pairs, not strings
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]),
        model_max_length=131072,
    )


# text encoder, VAE
def tiny_qwen_vl_text_encoder(tokenizer: Qwen2Tokenizer) -> Qwen2_5_VLForConditionalGeneration:
    """Qwen2.5-VL with a 2-layer, 32-wide language model and a 1-block vision tower."""
    ids = tokenizer.get_vocab().__getitem__  # token -> id
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": QWEN_TEXT_WIDTH,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1e6,
                "mrope_section": [2, 3, 3],
            },
            "bos_token_id": ids("<|endoftext|>"),
            "eos_token_id": ids("<|im_end|>"),
            "pad_token_id": ids("<|endoftext|>"),
        },
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_heads": 2,
            "patch_size": 2,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 8,
            "fullatt_block_indexes": [0],
            "out_hidden_size": QWEN_TEXT_WIDTH,
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def tiny_qwen_vae() -> AutoencoderKLQwenImage:
    """Causal-3D VAE with one (spatial-only) downsampling: factor 2, 4 latent channels."""
    return AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=QWEN_LATENT_CHANNELS,
        dim_mult=[1, 2],
        num_res_blocks=1,
        temperal_downsample=[False],  # one entry per downsampling: spatial factor 2 ** len
        latents_mean=[0.0] * QWEN_LATENT_CHANNELS,
        latents_std=[1.0] * QWEN_LATENT_CHANNELS,
    )


# pipeline
def tiny_qwen_image_pipeline(seed: int = 0) -> QwenImagePipeline:
    """Qwen-Image in miniature: 4 MMDiT blocks of 2 heads x 16 over 2 x 2-packed latents, a
    tiny Qwen2.5-VL text encoder, a factor-2 Qwen-Image VAE, the real scheduler config."""
    torch.manual_seed(seed)
    tokenizer = qwen_tokenizer()
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=4 * QWEN_LATENT_CHANNELS,  # latent channels packed 2 x 2
        out_channels=QWEN_LATENT_CHANNELS,  # proj_out: patch_size**2 * out_channels = in_channels
        num_layers=4,  # the first and last kept by depth pruning: two may go
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=QWEN_TEXT_WIDTH,
        guidance_embeds=False,
        axes_dims_rope=(4, 6, 6),  # (frame, height, width), even, sums to attention_head_dim
    )
    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER),
        vae=tiny_qwen_vae(),
        text_encoder=tiny_qwen_vl_text_encoder(tokenizer),
        tokenizer=tokenizer,
        transformer=transformer,
    )
    return set_eval_mode(pipe)


# --------------------------------------------------------------------------- FLUX.2
MISTRAL_WIDTH = 16  # hidden size of the tiny Mistral text model
MISTRAL_LAYERS = 31  # one more than the deepest layer the pipeline reads (30)
FLUX2_TEXT_LAYERS = (10, 20, 30)  # Flux2Pipeline's default `text_encoder_out_layers`
VISION_PATCH = 4  # Pixtral patch size of the tiny vision tower
SPATIAL_MERGE = 2  # Mistral-Small-3.1's patch merger

# Tekken (Mistral-Small-3.x) special tokens, at their real ids 0..19.
MISTRAL_SPECIALS = (
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]",
    "[IMG_END]", "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
    "[TOOL_CONTENT]",
)  # fmt: skip
IMG_TOKEN_ID = MISTRAL_SPECIALS.index("[IMG]")  # 10, as Mistral3Config's default

# Mistral-Small-3 style: <s>[SYSTEM_PROMPT]...[/SYSTEM_PROMPT][INST]...[/INST]answer</s>
# (content as a string or as a list of text/image blocks, as Flux2Pipeline's `format_input`).
MISTRAL_CHAT_TEMPLATE = (
    "{%- set default_system_message = 'You are a helpful assistant.' %}"
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- if messages[0]['content'] is string %}{%- set system_message = messages[0]['content'] %}"
    "{%- else %}{%- set system_message = messages[0]['content'][0]['text'] %}{%- endif %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}"
    "{%- set system_message = default_system_message %}{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{{- '[SYSTEM_PROMPT]' + system_message + '[/SYSTEM_PROMPT]' }}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if message['content'] is string %}{{- '[INST]' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST]' }}"
    "{%- for block in message['content'] %}"
    "{%- if block['type'] == 'text' %}{{- block['text'] }}"
    "{%- elif block['type'] in ['image', 'image_url'] %}{{- '[IMG]' }}"
    "{%- else %}{{- raise_exception('Only text and image blocks are supported!') }}{%- endif %}"
    "{%- endfor %}{{- '[/INST]' }}"
    "{%- endif %}"
    "{%- elif message['role'] == 'system' %}"
    "{%- if message['content'] is string %}{%- set text = message['content'] %}"
    "{%- else %}{%- set text = message['content'][0]['text'] %}{%- endif %}"
    "{{- '[SYSTEM_PROMPT]' + text + '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{%- if message['content'] is string %}{{- message['content'] + eos_token }}"
    "{%- else %}{{- message['content'][0]['text'] + eos_token }}{%- endif %}"
    "{%- else %}{{- raise_exception('Only user, system and assistant roles are supported!') }}"
    "{%- endif %}"
    "{%- endfor %}"
)


# tokenizer
def char_mistral_tokenizer(max_length: int = 512) -> PreTrainedTokenizerFast:
    """Byte-level BPE: Tekken's 20 special tokens (ids 0..19), the 256 byte-level characters,
    and each word of FLUX.2's system message as one token (so the system message is 27 tokens,
    not ~190, and a small `max_sequence_length` still reaches the prompt, which is otherwise
    one token per character)."""
    byte_level = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    vocab = {token: i for i, token in enumerate(MISTRAL_SPECIALS)}
    for char in sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    for word, _ in byte_level.pre_tokenize_str(FLUX2_SYSTEM_MESSAGE):
        vocab.setdefault(word, len(vocab))
    # No merges: a pre-tokenized word in the vocabulary is one token (`ignore_merges`,
    # as Llama-3's tokenizer), any other word falls back to its byte-level characters.
    model = tokenizers.models.BPE(vocab=vocab, merges=[], unk_token="<unk>", ignore_merges=True)
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = byte_level
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.add_special_tokens(
        [tokenizers.AddedToken(t, special=True, normalized=False) for t in MISTRAL_SPECIALS]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=max_length,
    )


def tiny_pixtral_processor() -> PixtralProcessor:
    """The pipeline's `tokenizer`: a PixtralProcessor (image processor sized to the tiny vision
    tower) around `char_mistral_tokenizer`, with the Mistral-Small-3 chat template."""
    image_processor = PixtralImageProcessor(
        size={"longest_edge": 32},
        patch_size={"height": VISION_PATCH, "width": VISION_PATCH},
    )
    return PixtralProcessor(
        image_processor=image_processor,
        tokenizer=char_mistral_tokenizer(),
        patch_size=VISION_PATCH,
        spatial_merge_size=SPATIAL_MERGE,
        chat_template=MISTRAL_CHAT_TEMPLATE,
    )


# encoder, VAE
def tiny_mistral3_encoder(vocab_size: int) -> Mistral3ForConditionalGeneration:
    """Mistral-Small-3.1 in miniature: 31 layers of width 16 (2 query heads x 8, 1 KV head),
    a one-layer Pixtral vision tower (2 heads x 8, patch 4) and the 2 x 2 patch merger."""
    config = Mistral3Config(
        text_config={
            "model_type": "mistral",
            "vocab_size": vocab_size,
            "hidden_size": MISTRAL_WIDTH,
            "intermediate_size": 32,
            "num_hidden_layers": MISTRAL_LAYERS,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 8,
            "max_position_embeddings": 1024,
            "rms_norm_eps": 1e-5,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e9},
            "sliding_window": None,
            "tie_word_embeddings": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": MISTRAL_SPECIALS.index("<pad>"),
        },
        vision_config={
            "model_type": "pixtral",
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": VISION_PATCH,
            "num_channels": 3,
        },
        image_token_index=IMG_TOKEN_ID,
        spatial_merge_size=SPATIAL_MERGE,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        multimodal_projector_bias=False,
        tie_word_embeddings=False,
    )
    return Mistral3ForConditionalGeneration(config)


def tiny_flux2_vae() -> AutoencoderKLFlux2:
    """Two-level FLUX.2 VAE: 4 latent channels, spatial factor 2; its latent BatchNorm (over
    the 2 x 2-patchified 16 channels) gets non-trivial running statistics, as a trained one."""
    vae = AutoencoderKLFlux2(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
    )
    with torch.no_grad():
        vae.bn.running_mean.copy_(0.1 * torch.randn_like(vae.bn.running_mean))
        vae.bn.running_var.copy_(0.5 + torch.rand_like(vae.bn.running_var))
    return vae


def flux2_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX.2-dev's scheduler config (its `scheduler/scheduler_config.json`: dynamic exponential
    shifting, the pipeline passes an empirical `mu`)."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        time_shift_type="exponential",
    )


# pipeline
def tiny_flux2_pipeline(seed: int = 0) -> Flux2Pipeline:
    """FLUX.2-dev in miniature: 2 double-stream and 2 single-stream blocks of 2 heads x 16,
    guidance-distilled (`guidance_embeds=True`, one transformer call per step)."""
    torch.manual_seed(seed)
    processor = tiny_pixtral_processor()
    text_encoder = tiny_mistral3_encoder(vocab_size=len(processor.tokenizer))
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 VAE latent channels patchified 2 x 2
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=len(FLUX2_TEXT_LAYERS) * MISTRAL_WIDTH,  # stacked Mistral layers
        timestep_guidance_channels=256,  # as the real model
        mlp_ratio=3.0,
        axes_dims_rope=(4, 4, 4, 4),  # (t, h, w, l); sums to attention_head_dim
        rope_theta=2000,
        guidance_embeds=True,
    )
    pipe = Flux2Pipeline(
        scheduler=flux2_scheduler(),
        vae=tiny_flux2_vae(),
        text_encoder=text_encoder,
        tokenizer=processor,
        transformer=transformer,
    )
    return set_eval_mode(pipe)


# --------------------------------------------------------------------------- Wan
WAN_TEXT_TOKENS = 512  # WanPipeline's default max_sequence_length (the real text context)
WAN22_BOUNDARY_RATIO = 0.875  # Wan2.2-T2V-A14B: `transformer` for t >= 875, then `transformer_2`


def tiny_umt5_encoder(d_model: int = TEXT_WIDTH) -> UMT5EncoderModel:
    """umt5-xxl in miniature: gated-GELU FFN, relative attention bias in every layer."""
    return UMT5EncoderModel(
        UMT5Config(
            vocab_size=200,
            d_model=d_model,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",
            pad_token_id=0,
            eos_token_id=1,
        )
    )


def tiny_wan_vae() -> AutoencoderKLWan:
    """The Wan 2.1 causal 3D VAE (also Wan 2.2-A14B's): 4 levels of 4 channels, 1 res block each,
    16 latent channels, 8x spatial and 4x temporal compression (the `scale_factor_spatial` and
    `scale_factor_temporal` the pipeline reads from its config)."""
    return AutoencoderKLWan(
        base_dim=4,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[False, True, True],
    )


def tiny_wan_transformer() -> WanTransformer3DModel:
    """WanTransformer3DModel in miniature: 4 blocks of 2 heads x 8 (self-attention with RoPE,
    cross-attention to the text, GELU-tanh FFN, the shared 6-way modulation), patch (1, 2, 2).
    Head width 8 splits into RoPE (t, h, w) = (4, 2, 2), all even, as the real 128 (44/42/42)."""
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=16,
        out_channels=16,
        text_dim=TEXT_WIDTH,
        freq_dim=256,
        ffn_dim=48,
        num_layers=4,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
    )


def wan_scheduler() -> UniPCMultistepScheduler:
    """The scheduler of the Wan 2.1 / 2.2 T2V diffusers repositories: UniPC (bh2, order 2) on
    flow sigmas, flow_shift 3.0 (diffusers' docs suggest 5.0 at 720p)."""
    return UniPCMultistepScheduler(
        num_train_timesteps=1000,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=3.0,
        solver_order=2,
        solver_type="bh2",
        predict_x0=True,
        lower_order_final=True,
        final_sigmas_type="zero",
        timestep_spacing="linspace",
    )


def tiny_wan_pipeline(seed: int = 0, two_experts: bool = False) -> WanPipeline:
    """Wan 2.1 T2V in miniature; `two_experts=True` is Wan 2.2-A14B's layout: `transformer` the
    high-noise expert (t >= boundary_ratio x 1000), `transformer_2` the low-noise one (its own
    weights), `boundary_ratio` 0.875 in the pipeline's config."""
    torch.manual_seed(seed)
    transformer = tiny_wan_transformer()
    transformer_2 = tiny_wan_transformer() if two_experts else None
    pipe = WanPipeline(
        tokenizer=char_t5_tokenizer(WAN_TEXT_TOKENS),
        text_encoder=tiny_umt5_encoder(TEXT_WIDTH),
        vae=tiny_wan_vae(),
        scheduler=wan_scheduler(),
        transformer=transformer,
        transformer_2=transformer_2,
        boundary_ratio=WAN22_BOUNDARY_RATIO if two_experts else None,
    )
    return set_eval_mode(pipe)
