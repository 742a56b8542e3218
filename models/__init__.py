"""Pure torch models and checkpoint converters. Nothing here imports ComfyUI."""
