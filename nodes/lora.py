"""Load LoRA: HunyuanVideo LoRAs (kohya / musubi-tuner, diffusers / PEFT and ComfyUI-style files) for the
transformer and, when a file carries them, the text encoders.

The work is in runtime/lora.py, imported when the node runs.
"""

from ..runtime.validation import check_declared
from ._common import check_model_files, model_choices


class KineFlowLoadLoRA:
    DESCRIPTION = ("Applies a HunyuanVideo LoRA (kohya / musubi-tuner, diffusers / PEFT or ComfyUI-style file) to a "
                   "copy of the video model, and its text-encoder layers, if it has any, to a copy of the text "
                   "encoders connected; the inputs are left unchanged. Chain several to combine them.")
    CATEGORY = "KineFlow/loaders"
    RETURN_TYPES = ("KINEFLOW_VIDEO_MODEL", "KINEFLOW_TEXT_ENCODER")
    RETURN_NAMES = ("model", "text_encoder")
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("KINEFLOW_VIDEO_MODEL", {"tooltip": "From Load Video Model or another Load LoRA."}),
            "lora_name": (model_choices("loras"), {"tooltip": "HunyuanVideo LoRA in models/loras."}),
            "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                   "tooltip": "How much of the LoRA to apply; 0 leaves the model as it is."}),
        }, "optional": {
            "block_strengths": ("STRING", {"default": "", "multiline": False, "tooltip": (
                "Optional factors per block, multiplied with strength, e.g. 'double_blocks=1, single_blocks.20-39=0.5'. "
                "The most specific entry wins; blocks not named get 1.")}),
            "text_encoders": ("KINEFLOW_TEXT_ENCODER", {"tooltip": (
                "Optional: from Load Text Encoders or another Load LoRA. The file's LLaMA / CLIP-L layers, if any, go "
                "into a copy given at the text_encoder output; unconnected, they are skipped with a warning.")}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, lora_name=None, strength=None, block_strengths=""):
        from ..errors import KineFlowError
        from ..models.lora import block_strengths as parse

        declared = check_declared(cls, strength=strength)
        if declared is not True:
            return declared
        try:
            parse(block_strengths or "")
        except KineFlowError as e:
            return str(e)
        return check_model_files(("loras", lora_name, "hunyuan_video_lora"))

    def apply(self, model, lora_name, strength, block_strengths="", text_encoders=None):
        from ..runtime import lora

        return lora.load_lora(model, text_encoders, lora_name, strength, block_strengths)


NODE_CLASS_MAPPINGS = {"KineFlowLoadLoRA": KineFlowLoadLoRA}
NODE_DISPLAY_NAME_MAPPINGS = {"KineFlowLoadLoRA": "Load LoRA (KineFlow)"}
