"""Pure torch models and checkpoint converters. Nothing here imports ComfyUI.

The attention backend names are the loader nodes' and the CLI's choices, kept here free of torch so that the node
registry loads without it; models/attention.py implements them (tests/test_attention.py checks that they agree).
"""

ATTENTION_BACKENDS = ("auto", "sdpa", "sdpa_math", "tiled", "sageattention", "flash_attn", "xformers")
