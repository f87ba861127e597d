"""AR-LDM backbone (plain torch.nn): UNet + VAE + CLIP + BLIP history encoder, builders and checkpoint loaders.

Entry points for the Lightning system: :func:`build_arldm_from_pretrained`, :func:`build_arldm_from_sizes`,
:func:`load_original_arldm_checkpoint`, :class:`ARLDM` (``training_loss``, ``sample``), the tokenizer helpers
and :func:`blip_preprocess`.
"""

from .autoencoder import PixelAutoencoder
from .blip import (
    BlipMultimodalConfig,
    BlipMultimodalEncoder,
    blip_null_image,
    blip_preprocess,
    blip_preprocess_pil,
    blip_resize,
    blip_resize_pil,
    interpolate_pos_embed,
    load_blip_checkpoint,
    load_salesforce_blip_state_dict,
)
from .clip import build_clip_text_encoder, extend_position_embeddings, load_clip_text_encoder, resize_token_embeddings
from .context import assemble_context, block_causal_mask, context_mask, keep_mask, unconditional_mask
from .loading import (
    ARLDMComponents,
    build_arldm_from_pretrained,
    build_arldm_from_sizes,
    load_original_arldm_checkpoint,
)
from .model import ARLDM, TrainingStepOutput, masked_unet_forward, to_uint8_images
from .tokenizers import (
    add_character_tokens,
    blip_enc_token_id,
    load_blip_tokenizer,
    load_clip_tokenizer,
    tokenize,
    write_bert_tokenizer,
    write_clip_tokenizer,
)

__all__ = [
    "ARLDM",
    "ARLDMComponents",
    "BlipMultimodalConfig",
    "BlipMultimodalEncoder",
    "PixelAutoencoder",
    "TrainingStepOutput",
    "add_character_tokens",
    "assemble_context",
    "blip_enc_token_id",
    "blip_null_image",
    "blip_preprocess",
    "blip_preprocess_pil",
    "blip_resize",
    "blip_resize_pil",
    "block_causal_mask",
    "build_arldm_from_pretrained",
    "build_arldm_from_sizes",
    "build_clip_text_encoder",
    "context_mask",
    "extend_position_embeddings",
    "interpolate_pos_embed",
    "keep_mask",
    "load_blip_checkpoint",
    "load_blip_tokenizer",
    "load_clip_text_encoder",
    "load_clip_tokenizer",
    "load_original_arldm_checkpoint",
    "load_salesforce_blip_state_dict",
    "masked_unet_forward",
    "resize_token_embeddings",
    "to_uint8_images",
    "tokenize",
    "unconditional_mask",
    "write_bert_tokenizer",
    "write_clip_tokenizer",
]
