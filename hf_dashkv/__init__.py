"""hf_dashkv: DASH-KV (arXiv 2604.19351) hashed decode-time attention for Hugging Face transformers.

Importing this package registers the attention implementation ``"dashkv"`` (the attention function and its
mask) with transformers, so ``from_pretrained(..., attn_implementation="dashkv")`` works afterwards.
"""

from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .attention import dashkv_attention_forward
from .cache import DashKVCache, DashKVLayer
from .config import DashKVConfig
from .encoders import HashEncoders
from .layout import ModelLayout

ATTN_IMPLEMENTATION = "dashkv"

AttentionInterface.register(ATTN_IMPLEMENTATION, dashkv_attention_forward)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)

__all__ = ["ATTN_IMPLEMENTATION", "DashKVCache", "DashKVConfig", "DashKVLayer", "HashEncoders", "ModelLayout"]
__version__ = "0.1.0"
