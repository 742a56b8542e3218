"""Prompt travel: a Text Encode that takes a per-frame prompt schedule (the work is in runtime/generation.py and
samplers/prompt_travel.py, imported when the node runs)."""

from ..runtime.validation import check_declared
from ..samplers.prompt_schedule import schedule_problem

DEFAULT_SCHEDULE = ('"0": "a red circle moves to the right on a blue background",\n'
                    '"8": "a green circle moves to the right on a blue background"')


class KineFlowPromptSchedule:
    DESCRIPTION = ("Text Encode for prompt travel: a prompt per keyframe, in AnimateDiff-Evolved / FizzNodes batch "
                   "schedule syntax (\"0\": \"prompt\", \"8\": \"prompt\"; keys are video frames). Between keyframes "
                   "the encoded prompts are interpolated linearly; before the first and after the last keyframe "
                   "the nearest prompt holds. With context windows each window gets the prompt of its frames. "
                   "Works for both families (see the README's Prompt travel section).")
    CATEGORY = "KineFlow/conditioning"
    RETURN_TYPES = ("KINEFLOW_CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder": ("KINEFLOW_TEXT_ENCODER", {"tooltip": "From Load Text Encoders (HunyuanVideo) or Load SD Checkpoint (AnimateDiff)."}),
            "schedule": ("STRING", {"multiline": True, "default": DEFAULT_SCHEDULE, "tooltip": "One keyframe per line: \"frame\": \"prompt\", separated by commas. Frames are video frames (HunyuanVideo: latent frame t covers video frames 4t-3..4t), in increasing order, each once, below the video's frame count."}),
            "negative_prompt": ("STRING", {"multiline": True, "default": "", "tooltip": "What to steer away from on every frame (empty = the unconditional prompt); used only when the sampler's cfg is not 1."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, schedule=None):
        declared = check_declared(cls, schedule=schedule)
        if declared is not True or schedule is None:
            return declared
        return schedule_problem(schedule) or True

    def encode(self, text_encoder, schedule, negative_prompt):
        from ..runtime import generation

        return (generation.encode_schedule(text_encoder, schedule, negative_prompt),)


NODE_CLASS_MAPPINGS = {"KineFlowPromptSchedule": KineFlowPromptSchedule}
NODE_DISPLAY_NAME_MAPPINGS = {"KineFlowPromptSchedule": "Prompt Schedule (KineFlow)"}
