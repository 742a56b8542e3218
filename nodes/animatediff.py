"""AnimateDiff family nodes: SD1.5 loaders, motion modules, motion LoRAs and the v3 domain adapter.

Prompts, latents, sampling and decoding use the shared generation nodes (Text Encode, Empty Video Latent with
latent_format "sd15", Sampler, Context Options, VAE Decode / Encode). The work is in runtime/animatediff.py,
imported when a node runs.
"""

from ..runtime.validation import check_declared
from ..samplers import PREDICTION_NAMES
from ._common import (ATTENTION_INPUT, COMPILE_INPUT, DTYPE_CHOICES, DTYPE_TOOLTIP, OFFLOAD_INPUT, check_model_files,
                      model_choices as _choices)

PREDICTION_INPUT = (list(PREDICTION_NAMES), {
    "default": "eps",
    "tooltip": "What the UNet predicts: eps (noise; SD1.5 and nearly every fine-tune) or v (v-prediction fine-tunes).",
})
SD_OUTPUTS = ("KINEFLOW_VIDEO_MODEL", "KINEFLOW_VAE", "KINEFLOW_TEXT_ENCODER")
SD_OUTPUT_NAMES = ("model", "vae", "text_encoder")


class KineFlowLoadSDCheckpoint:
    DESCRIPTION = ("Loads an SD1.5 checkpoint (one LDM file from checkpoints/: UNet, VAE and CLIP-L) for AnimateDiff. "
                   "Without a motion module the model renders every frame as an independent image.")
    CATEGORY = "KineFlow/loaders"
    RETURN_TYPES = SD_OUTPUTS
    RETURN_NAMES = SD_OUTPUT_NAMES
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "ckpt_name": (_choices("checkpoints"), {"tooltip": "SD1.5 checkpoint (.safetensors, or .ckpt loadable safely) in models/checkpoints."}),
            "prediction": PREDICTION_INPUT,
            "dtype": (DTYPE_CHOICES, {"default": "auto", "tooltip": DTYPE_TOOLTIP}),
        }, "optional": {"offload": OFFLOAD_INPUT, "attention": ATTENTION_INPUT, "compile": COMPILE_INPUT}}

    @classmethod
    def VALIDATE_INPUTS(cls, ckpt_name=None):
        return check_model_files(("checkpoints", ckpt_name, "sd15_checkpoint"))

    def load(self, ckpt_name, prediction, dtype, offload="auto", attention="auto", compile="auto"):
        from ..runtime import animatediff as ad_runtime

        return ad_runtime.load_sd_checkpoint(ckpt_name, prediction, dtype, offload, attention, compile)


class KineFlowLoadSDComponents:
    DESCRIPTION = ("Loads SD1.5 from separate files: the UNet from diffusion_models/, the VAE from vae/ and CLIP-L "
                   "from text_encoders/ (LDM or diffusers names for UNet and VAE).")
    CATEGORY = "KineFlow/loaders"
    RETURN_TYPES = SD_OUTPUTS
    RETURN_NAMES = SD_OUTPUT_NAMES
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "unet_name": (_choices("diffusion_models"), {"tooltip": "SD1.5 UNet in models/diffusion_models (or models/unet)."}),
            "vae_name": (_choices("vae"), {"tooltip": "SD KL-f8 VAE in models/vae."}),
            "clip_name": (_choices("text_encoders"), {"tooltip": "CLIP-L text encoder in models/text_encoders (or models/clip)."}),
            "prediction": PREDICTION_INPUT,
            "dtype": (DTYPE_CHOICES, {"default": "auto", "tooltip": DTYPE_TOOLTIP}),
        }, "optional": {"offload": OFFLOAD_INPUT, "attention": ATTENTION_INPUT, "compile": COMPILE_INPUT}}

    @classmethod
    def VALIDATE_INPUTS(cls, unet_name=None, vae_name=None, clip_name=None):
        return check_model_files(("diffusion_models", unet_name, "sd15_unet"), ("vae", vae_name, "sd_vae"),
                                 ("text_encoders", clip_name, "clip_text"))

    def load(self, unet_name, vae_name, clip_name, prediction, dtype, offload="auto", attention="auto", compile="auto"):
        from ..runtime import animatediff as ad_runtime

        return ad_runtime.load_sd_components(unet_name, vae_name, clip_name, prediction, dtype, offload, attention,
                                             compile)


class KineFlowLoadMotionModule:
    DESCRIPTION = ("Loads an AnimateDiff motion module (v1, v2 or v3 for SD1.5, told apart from the file) from "
                   "animatediff_models/. Its positional table caps the frames per window: 24 for v1, 32 for v2/v3.")
    CATEGORY = "KineFlow/loaders"
    RETURN_TYPES = ("KINEFLOW_MOTION_MODULE",)
    RETURN_NAMES = ("motion_module",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_name": (_choices("animatediff_models"), {"tooltip": "Motion module (e.g. mm_sd_v15_v2.ckpt, v3_sd15_mm.ckpt) in models/animatediff_models."}),
            "dtype": (DTYPE_CHOICES, {"default": "auto", "tooltip": DTYPE_TOOLTIP}),
        }, "optional": {"offload": OFFLOAD_INPUT, "attention": ATTENTION_INPUT}}

    @classmethod
    def VALIDATE_INPUTS(cls, model_name=None):
        return check_model_files(("animatediff_models", model_name, "animatediff_motion_module"))

    def load(self, model_name, dtype, offload="auto", attention="auto"):
        from ..runtime import animatediff as ad_runtime

        return (ad_runtime.load_motion_module(model_name, dtype, offload, attention),)


class KineFlowLoadMotionLoRA:
    DESCRIPTION = ("Merges a motion LoRA (camera moves such as zoom or pan) into a copy of the motion module. "
                   "Chain several to combine them; the input module is left unchanged.")
    CATEGORY = "KineFlow/animatediff"
    RETURN_TYPES = ("KINEFLOW_MOTION_MODULE",)
    RETURN_NAMES = ("motion_module",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "motion_module": ("KINEFLOW_MOTION_MODULE", {"tooltip": "From Load Motion Module or another Load Motion LoRA."}),
            "lora_name": (_choices("animatediff_motion_lora"), {"tooltip": "Motion LoRA in models/animatediff_motion_lora."}),
            "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01, "tooltip": "How much of the LoRA to merge; 0 leaves the module as it is."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, lora_name=None, strength=None):
        declared = check_declared(cls, strength=strength)
        if declared is not True:
            return declared
        return check_model_files(("animatediff_motion_lora", lora_name, "animatediff_motion_lora"))

    def apply(self, motion_module, lora_name, strength):
        from ..runtime import animatediff as ad_runtime

        return (ad_runtime.apply_motion_lora(motion_module, lora_name, strength),)


class KineFlowApplyMotionModule:
    DESCRIPTION = ("Adds an AnimateDiff motion module to an SD1.5 model, so the frames of a video are denoised "
                   "together. Returns a new model; the input model is left unchanged.")
    CATEGORY = "KineFlow/animatediff"
    RETURN_TYPES = ("KINEFLOW_VIDEO_MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("KINEFLOW_VIDEO_MODEL", {"tooltip": "From Load SD Checkpoint."}),
            "motion_module": ("KINEFLOW_MOTION_MODULE", {"tooltip": "From Load Motion Module (optionally through Load Motion LoRA)."}),
            "scale": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01, "tooltip": "Motion strength: multiplies every temporal layer's contribution; 0 gives independent frames."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, scale=None):
        return check_declared(cls, scale=scale)

    def apply(self, model, motion_module, scale):
        from ..runtime import animatediff as ad_runtime

        return (ad_runtime.apply_motion_module(model, motion_module, scale),)


class KineFlowApplyDomainAdapter:
    DESCRIPTION = ("Merges the AnimateDiff v3 domain adapter (a LoRA on the SD1.5 attention layers, e.g. "
                   "v3_sd15_adapter.ckpt) into a copy of the model's UNet. Use it with the v3 motion module.")
    CATEGORY = "KineFlow/animatediff"
    RETURN_TYPES = ("KINEFLOW_VIDEO_MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("KINEFLOW_VIDEO_MODEL", {"tooltip": "From Load SD Checkpoint or Apply Motion Module."}),
            "adapter_name": (_choices("loras"), {"tooltip": "Domain adapter LoRA in models/loras."}),
            "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01, "tooltip": "How much of the adapter to merge: 1 = as trained, 0 = the model unchanged."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, adapter_name=None, strength=None):
        declared = check_declared(cls, strength=strength)
        if declared is not True:
            return declared
        return check_model_files(("loras", adapter_name, "animatediff_domain_adapter"))

    def apply(self, model, adapter_name, strength):
        from ..runtime import animatediff as ad_runtime

        return (ad_runtime.apply_domain_adapter(model, adapter_name, strength),)


NODE_CLASS_MAPPINGS = {
    "KineFlowLoadSDCheckpoint": KineFlowLoadSDCheckpoint,
    "KineFlowLoadSDComponents": KineFlowLoadSDComponents,
    "KineFlowLoadMotionModule": KineFlowLoadMotionModule,
    "KineFlowLoadMotionLoRA": KineFlowLoadMotionLoRA,
    "KineFlowApplyMotionModule": KineFlowApplyMotionModule,
    "KineFlowApplyDomainAdapter": KineFlowApplyDomainAdapter,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "KineFlowLoadSDCheckpoint": "Load SD Checkpoint (KineFlow)",
    "KineFlowLoadSDComponents": "Load SD Components (KineFlow)",
    "KineFlowLoadMotionModule": "Load Motion Module (KineFlow)",
    "KineFlowLoadMotionLoRA": "Load Motion LoRA (KineFlow)",
    "KineFlowApplyMotionModule": "Apply Motion Module (KineFlow)",
    "KineFlowApplyDomainAdapter": "Apply Domain Adapter (KineFlow)",
}
