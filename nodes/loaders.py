"""Loader nodes for the HunyuanVideo family: diffusion model, VAE, text encoders, LLaVA's CLIP vision encoder
(runtime/video_models.py, imported when a node runs)."""

from ..runtime.model_files import llm_tokenizer_problem
from ._common import (ATTENTION_INPUT, COMPILE_INPUT, DTYPE_CHOICES, DTYPE_TOOLTIP, OFFLOAD_INPUT, check_model_files,
                      model_choices as _choices)


class KineFlowLoadVideoModel:
    DESCRIPTION = ("Loads a HunyuanVideo transformer from diffusion_models/ (Tencent original, ComfyUI or diffusers "
                   "layout, .safetensors or .pt). Weights are assigned in the chosen dtype without a float32 copy.")
    CATEGORY = "KineFlow/loaders"
    RETURN_TYPES = ("KINEFLOW_VIDEO_MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_name": (_choices("diffusion_models", folders=True), {"tooltip": "Transformer checkpoint (file, or diffusers folder with config.json) in models/diffusion_models (or models/unet)."}),
            "weight_dtype": (DTYPE_CHOICES, {"default": "auto", "tooltip": DTYPE_TOOLTIP}),
            "fp8": (["disabled", "e4m3fn"], {"default": "disabled", "tooltip": "Store linear weights as fp8 e4m3 (half of bf16's memory) and upcast each layer when it runs."}),
        }, "optional": {
            "offload": OFFLOAD_INPUT,
            "resident_blocks": ("INT", {"default": -1, "min": -1, "max": 1000, "step": 1, "tooltip": "With offload 'blocks': how many transformer blocks stay on the device; -1 = as many as the memory budget allows."}),
            "attention": ATTENTION_INPUT,
            "compile": COMPILE_INPUT,
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, model_name=None):
        return check_model_files(("diffusion_models", model_name, "hunyuan_video_dit"))

    def load(self, model_name, weight_dtype, fp8, offload="auto", resident_blocks=-1, attention="auto", compile="auto"):
        from ..runtime.video_models import load_video_model

        return (load_video_model(model_name, weight_dtype, fp8=fp8 == "e4m3fn", offload=offload,
                                 resident_blocks=None if resident_blocks < 0 else resident_blocks, attention=attention,
                                 compile=compile),)


class KineFlowLoadVideoVAE:
    DESCRIPTION = "Loads the HunyuanVideo causal 3D VAE (4x time, 8x space) from vae/, in the original, ComfyUI or diffusers layout."
    CATEGORY = "KineFlow/loaders"
    RETURN_TYPES = ("KINEFLOW_VAE",)
    RETURN_NAMES = ("vae",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae_name": (_choices("vae", folders=True), {"tooltip": "VAE checkpoint (file, or diffusers folder with config.json) in models/vae."}),
            "dtype": (DTYPE_CHOICES, {"default": "auto", "tooltip": DTYPE_TOOLTIP}),
        }, "optional": {"offload": OFFLOAD_INPUT, "attention": ATTENTION_INPUT}}

    @classmethod
    def VALIDATE_INPUTS(cls, vae_name=None):
        return check_model_files(("vae", vae_name, "hunyuan_video_vae"))

    def load(self, vae_name, dtype, offload="auto", attention="auto"):
        from ..runtime.video_models import load_video_vae

        return (load_video_vae(vae_name, dtype, offload, attention),)


class KineFlowLoadTextEncoders:
    DESCRIPTION = ("Loads the LLaMA hidden-state text encoder and CLIP-L from text_encoders/ (files or Hugging Face "
                   "folders). The LLaMA tokenizer.json is read from the LLaMA folder, from next to its file, or from "
                   "the path given; CLIP's tokenizer ships with KineFlow.")
    CATEGORY = "KineFlow/loaders"
    RETURN_TYPES = ("KINEFLOW_TEXT_ENCODER",)
    RETURN_NAMES = ("text_encoder",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        choices = _choices("text_encoders", folders=True)
        return {"required": {
            "llm_name": (choices, {"tooltip": "LLaMA text encoder (file or folder) in models/text_encoders or models/clip."}),
            "clip_name": (choices, {"tooltip": "CLIP-L text encoder (file or folder) in models/text_encoders or models/clip."}),
            "dtype": (DTYPE_CHOICES, {"default": "auto", "tooltip": DTYPE_TOOLTIP}),
        }, "optional": {
            "llm_tokenizer": ("STRING", {"default": "", "tooltip": "tokenizer.json (or its folder) for the LLaMA encoder: an absolute path or a name inside text_encoders/. Empty = look beside the model."}),
            "crop_start": ("INT", {"default": -1, "min": -1, "max": 1024, "step": 1, "tooltip": "Template tokens cut from the LLaMA states; -1 = count them from the template (95 for HunyuanVideo's video template)."}),
            "offload": OFFLOAD_INPUT,
            "attention": ATTENTION_INPUT,
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, llm_name=None, clip_name=None, llm_tokenizer=""):
        files = check_model_files(("text_encoders", llm_name, None, "llama_text"), ("text_encoders", clip_name))
        if files is not True or llm_name is None or llm_tokenizer is None:
            return files
        return llm_tokenizer_problem(llm_name, llm_tokenizer) or True

    def load(self, llm_name, clip_name, dtype, llm_tokenizer="", crop_start=-1, offload="auto", attention="auto"):
        from ..runtime.video_models import load_text_encoders

        return (load_text_encoders(llm_name, clip_name, llm_tokenizer, dtype, crop_start, offload, attention),)


class KineFlowLoadCLIPVision:
    DESCRIPTION = ("Loads LLaVA's image encoder (CLIP ViT-L/14 at 336 px + the multimodal projector) from clip_vision/: "
                   "ComfyUI's llava_llama3_vision.safetensors, or a file or folder of transformers' "
                   "LlavaForConditionalGeneration (HunyuanVideo-I2V's text_encoder; only its vision part is read). "
                   "Text Encode (Image To Video) uses it to put the first frame into HunyuanVideo-I2V's prompt.")
    CATEGORY = "KineFlow/loaders"
    RETURN_TYPES = ("KINEFLOW_CLIP_VISION",)
    RETURN_NAMES = ("clip_vision",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip_name": (_choices("clip_vision", folders=True), {"tooltip": "LLaVA vision encoder (file, or LLaVA folder with config.json) in models/clip_vision, e.g. llava_llama3_vision.safetensors."}),
            "dtype": (DTYPE_CHOICES, {"default": "auto", "tooltip": DTYPE_TOOLTIP}),
        }, "optional": {"offload": OFFLOAD_INPUT, "attention": ATTENTION_INPUT}}

    @classmethod
    def VALIDATE_INPUTS(cls, clip_name=None):
        return check_model_files(("clip_vision", clip_name, "clip_vision"))

    def load(self, clip_name, dtype, offload="auto", attention="auto"):
        from ..runtime.video_models import load_clip_vision

        return (load_clip_vision(clip_name, dtype, offload, attention),)


NODE_CLASS_MAPPINGS = {
    "KineFlowLoadVideoModel": KineFlowLoadVideoModel,
    "KineFlowLoadVideoVAE": KineFlowLoadVideoVAE,
    "KineFlowLoadTextEncoders": KineFlowLoadTextEncoders,
    "KineFlowLoadCLIPVision": KineFlowLoadCLIPVision,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "KineFlowLoadVideoModel": "Load Video Model (KineFlow)",
    "KineFlowLoadVideoVAE": "Load Video VAE (KineFlow)",
    "KineFlowLoadTextEncoders": "Load Text Encoders (KineFlow)",
    "KineFlowLoadCLIPVision": "Load CLIP Vision (KineFlow)",
}
