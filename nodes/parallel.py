"""Parallel Options: the degrees by which a run over several processes splits the Sampler's transformer, and the
devices of worker processes that make a one-process run (a ComfyUI server) such a run (the work is in
runtime/distributed.py and runtime/workers.py)."""

from ..runtime.validation import check_declared
from ..runtime.workers import device_list_problem

MAX_DEGREE = 64


class KineFlowParallelOptions:
    DESCRIPTION = ("How a run over several processes splits the Sampler's HunyuanVideo transformer: ulysses x ring x "
                   "cfg must equal the number of processes; 0 lets KineFlow choose (cfg 2 when cfg is not 1 and the "
                   "processes pair up, Ulysses as far as it divides the attention heads, ring for the rest). The "
                   "processes are those of `kineflow run --nproc N` (or torchrun; overrides --ulysses / --ring / "
                   "--cfg-parallel), or, with devices, this process plus one worker per listed device: inside ComfyUI "
                   "the workers start with the first prompt (each loads the model from its file) and stay for the "
                   "next ones. Without devices, in a run of one process it changes nothing and says so in the log.")
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
        }, "optional": {
            "devices": ("STRING", {"default": "", "tooltip": "The WORKERS' devices, one per worker, comma-separated: 'cuda:1,cuda:2,cuda:3' or 'cpu,cpu'. This process (ComfyUI) is rank 0 on its own device and is not listed, so N devices make N + 1 processes. Of ComfyUI's device type, each CUDA device once. HunyuanVideo models from Load Video Model (and Load LoRA). Empty: no workers."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, ulysses=None, ring=None, cfg=None, devices=None):
        declared = check_declared(cls, ulysses=ulysses, ring=ring, cfg=cfg)
        problem = device_list_problem(devices) if isinstance(devices, str) else None
        if problem:
            return problem if declared is True else f"{declared}; {problem}"
        return declared

    def build(self, ulysses, ring, cfg, devices=""):
        from ..runtime.distributed import Degrees, check_degrees
        from ..runtime.workers import parse_devices

        workers = parse_devices(devices)
        degrees = Degrees(ulysses=ulysses, ring=ring, cfg=cfg, devices=workers)
        if workers:
            check_degrees(degrees, len(workers) + 1)
        return (degrees,)


NODE_CLASS_MAPPINGS = {"KineFlowParallelOptions": KineFlowParallelOptions}
NODE_DISPLAY_NAME_MAPPINGS = {"KineFlowParallelOptions": "Parallel Options (KineFlow)"}
