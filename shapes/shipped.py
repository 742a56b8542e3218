"""File names of the tiny shapes-world models shipped in weights/ (what `kineflow eval` loads by default), and the
captions their text encoders learned the words of (shapes/vocabulary.py)."""

# HunyuanVideo family, by part (diffusion_models/, vae/, text_encoders/ x2).
HUNYUAN_VIDEO = {
    "dit": "kineflow_tiny_dit.safetensors",
    "vae": "kineflow_tiny_vae.safetensors",
    "llm": "kineflow_tiny_llm",
    "clip": "kineflow_tiny_clip.safetensors",
}
# The image-to-video transformer fine-tuned from the HunyuanVideo one (training/train_i2v.py); it reads the same VAE
# and text encoders.
HUNYUAN_VIDEO_I2V_DIT = "kineflow_tiny_i2v_dit.safetensors"
# The LoRA teaching that transformer the speed word "quickly" (training/train_lora.py), in loras/.
QUICKLY_LORA = "kineflow_tiny_quickly_lora.safetensors"
# AnimateDiff family: an SD1.5 checkpoint (checkpoints/) and its motion module (animatediff_models/).
ANIMATEDIFF_CHECKPOINT = "kineflow_tiny_sd15.safetensors"
ANIMATEDIFF_MOTION_MODULE = "kineflow_tiny_mm.safetensors"

# The caption sentence forms (shapes/dataset.py template sets) whose words each shipped text encoder file knows:
# the HunyuanVideo family's word-level tokenizer holds the training and held-out captions' words; the AnimateDiff
# CLIP also trained on the extra sentence forms.
TEXT_ENCODER_TEMPLATES = {
    HUNYUAN_VIDEO["llm"]: ("train", "heldout"),
    ANIMATEDIFF_CHECKPOINT: ("train", "heldout", "extra"),
}

