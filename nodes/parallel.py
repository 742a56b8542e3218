"""Parallel Options: the degrees by which a run over several processes splits the Sampler's transformer (the work is
in runtime/distributed.py)."""

from ..runtime.validation import check_declared

MAX_DEGREE = 64


class KineFlowParallelOptions:
    DESCRIPTION = ("How a run over several processes (`kineflow run --nproc N`, or torchrun) splits the Sampler's "
                   "HunyuanVideo transformer: ulysses x ring x cfg must equal the number of processes; 0 lets KineFlow "
                   "choose (cfg 2 when cfg is not 1 and the processes pair up, Ulysses as far as it divides the "
                   "attention heads, ring for the rest). Overrides --ulysses / --ring / --cfg-parallel. In a run of "
                   "one process, such as a ComfyUI server, it changes nothing and says so in the log.")
    CATEGORY = "KineFlow/sampling"
    RETURN_TYPES = ("KINEFLOW_PARALLEL",)
    RETURN_NAMES = ("parallel",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "ulysses": ("INT", {"default": 0, "min": 0, "max": MAX_DEGREE, "step": 1, "tooltip": "Processes that split the attention heads (all-to-all); 0 = choose."}),
            "ring": ("INT", {"default": 0, "min": 0, "max": MAX_DEGREE, "step": 1, "tooltip": "Processes that pass the video tokens' keys and values around a ring; 0 = choose."}),
            "cfg": ("INT", {"default": 0, "min": 0, "max": 2, "step": 1, "tooltip": "2: the conditional and unconditional passes of CFG on different processes; 1: not split; 0 = choose."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, ulysses=None, ring=None, cfg=None):
        return check_declared(cls, ulysses=ulysses, ring=ring, cfg=cfg)

    def build(self, ulysses, ring, cfg):
        from ..runtime.distributed import Degrees

        return (Degrees(ulysses=ulysses, ring=ring, cfg=cfg),)


NODE_CLASS_MAPPINGS = {"KineFlowParallelOptions": KineFlowParallelOptions}
NODE_DISPLAY_NAME_MAPPINGS = {"KineFlowParallelOptions": "Parallel Options (KineFlow)"}
