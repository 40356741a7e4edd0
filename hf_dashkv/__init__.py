"""hf_dashkv: DASH-KV (arXiv 2604.19351) hashed decode-time attention for Hugging Face transformers.

Importing this package registers the attention implementation ``"dashkv"`` (the attention function and its
mask) with transformers, so ``from_pretrained(..., attn_implementation="dashkv")`` works afterwards, and
``"dashkv-train"`` (plain SDPA that can capture q/k/v or attend as a decode step selects: ``hf_dashkv.capture``),
which training and the recall probe use.
"""

from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .attention import dashkv_attention_forward
from .cache import DashKVCache, DashKVLayer
from .compat import with_cache
from .capture import TRAIN_IMPLEMENTATION, train_attention_forward
from .config import EncoderConfig
from .encoders import HashEncoders
from .layout import ModelLayout
from .policy import DecodePolicy

ATTN_IMPLEMENTATION = "dashkv"

# The sdpa mask too: without a registered mask function transformers builds none, so padding would be ignored and
# sliding-window layers (Gemma 3) would attend to the whole causal context.
for _name, _forward in ((ATTN_IMPLEMENTATION, dashkv_attention_forward),
                        (TRAIN_IMPLEMENTATION, train_attention_forward)):
    AttentionInterface.register(_name, _forward)
    AttentionMaskInterface.register(_name, sdpa_mask)

__all__ = [
    "ATTN_IMPLEMENTATION", "TRAIN_IMPLEMENTATION", "DashKVCache", "DashKVLayer", "DecodePolicy", "EncoderConfig",
    "HashEncoders", "ModelLayout", "with_cache",
]
__version__ = "0.1.0"
