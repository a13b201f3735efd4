"""The real full-size Kolors architectures as plain dicts: UNet, VAE, ChatGLM text encoder, scheduler.

Copied from the ``config.json`` / ``scheduler_config.json`` files of the ``Kwai-Kolors/Kolors-diffusers``
hub repository (``unet/``, ``vae/``, ``text_encoder/``, ``scheduler/``), so benchmarks, export checks
and the tiny builders can build or compare the real shapes without the 20 GB download and without
importing diffusers.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "KOLORS_FULL_SIZE_CONFIGS",
    "KOLORS_SCHEDULER_CONFIG",
    "KOLORS_TEXT_ENCODER_CONFIG",
    "KOLORS_UNET_CONFIG",
    "KOLORS_VAE_CONFIG",
]


KOLORS_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.18.0.dev0",
    "beta_end": 0.014,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "dynamic_thresholding_ratio": 0.995,
    "interpolation_type": "linear",
    "num_train_timesteps": 1100,
    "prediction_type": "epsilon",
    "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "thresholding": False,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
"""``scheduler/scheduler_config.json`` of Kolors-diffusers. Kolors was trained with 1100 steps and
beta_end 0.014 (SDXL: 1000 / 0.012); reusing SDXL's schedule silently degrades samples. The values
match the Kolors ComfyUI wrappers' hard-coded copy and serialise (indent 2) to the 606 bytes the
hub lists for the file."""

KOLORS_UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "attention_type": "default",
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dropout": 0.0,
    "dual_cross_attention": False,
    "encoder_hid_dim": 4096,
    "encoder_hid_dim_type": "text_proj",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 5632,  # 4096 (ChatGLM pooled) + 6 * 256 (time ids)
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "reverse_transformer_layers_per_block": None,
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": False,
    "use_linear_projection": True,
}
"""SDXL's UNet with ChatGLM conditioning (2.579 B params)."""

KOLORS_VAE_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
"""The SDXL VAE (Kolors ships it unchanged; 83.65 M params)."""

KOLORS_TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "add_bias_linear": False,
    "add_qkv_bias": True,
    "apply_query_key_layer_scaling": True,
    "apply_residual_connection_post_layernorm": False,
    "attention_dropout": 0.0,
    "attention_softmax_in_fp32": True,
    "bias_dropout_fusion": True,
    "eos_token_id": 2,
    "ffn_hidden_size": 13696,
    "fp32_residual_connection": False,
    "hidden_dropout": 0.0,
    "hidden_size": 4096,
    "kv_channels": 128,
    "layernorm_epsilon": 1e-05,
    "multi_query_attention": True,
    "multi_query_group_num": 2,
    "num_attention_heads": 32,
    "num_layers": 28,
    "original_rope": True,
    "pad_token_id": 0,
    "padded_vocab_size": 65024,
    "post_layer_norm": True,
    "prefix_projection": False,
    "pre_seq_len": None,
    "quantization_bit": 0,
    "rmsnorm": True,
    "seq_length": 32768,
    "tie_word_embeddings": False,
    "use_cache": True,
}
"""ChatGLM3-6B-base as Kolors ships it (6.24 B params incl. the unused 266 M output layer)."""

KOLORS_FULL_SIZE_CONFIGS: dict[str, dict[str, Any]] = {
    "unet": KOLORS_UNET_CONFIG,
    "vae": KOLORS_VAE_CONFIG,
    "text_encoder": KOLORS_TEXT_ENCODER_CONFIG,
    "scheduler": KOLORS_SCHEDULER_CONFIG,
}
