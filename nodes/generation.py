"""Generation nodes shared by the model families: text encode, empty latent, sampler, VAE decode/encode (the work is
in runtime/generation.py, imported when a node runs)."""

from ..models.tiling import tiling_problem
from ..runtime import host
from ..runtime.latent_formats import IMAGE_CONDITION_MODES, LATENT_FORMATS, validate_latent_inputs, video_memory_problem
from ..runtime.validation import check_declared
from ..samplers import DEFAULT_STEP_CACHE_THRESHOLD, SAMPLER_NAMES, SCHEDULER_NAMES, context_problem

MAX_SIZE = 8192
MAX_SEED = 0xFFFFFFFFFFFFFFFF


def check_video_size(cls, family, width, height, frames, batch_size, **other_inputs) -> bool | str:
    """VALIDATE_INPUTS body of a node that makes a video latent: its declared inputs (naming them in VALIDATE_INPUTS
    makes ComfyUI skip its own range/list checks, so all are checked here), the size for `latent_format` and whether
    the latent fits the memory budget; `family` is the latent format whose size rules apply. Linked (None) inputs
    are checked when the node runs."""
    sizes = dict(width=width, height=height, frames=frames, batch_size=batch_size)
    declared = check_declared(cls, **sizes, **other_inputs)
    if declared is not True or None in sizes.values() or family is None:
        return declared
    size = validate_latent_inputs(family, width, height, frames, max_size=MAX_SIZE, max_frames=1025)
    if size is not True:
        return size
    return video_memory_problem(family, width, height, frames, batch_size, host.read_budget(),
                                host.RAISE_BUDGET) or True


class KineFlowTextEncode:
    DESCRIPTION = "Encodes a prompt and a negative prompt (the unconditional branch of CFG) into conditioning for the sampler."
    CATEGORY = "KineFlow/conditioning"
    RETURN_TYPES = ("KINEFLOW_CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder": ("KINEFLOW_TEXT_ENCODER", {"tooltip": "From Load Text Encoders (HunyuanVideo) or Load SD Checkpoint (AnimateDiff)."}),
            "prompt": ("STRING", {"multiline": True, "default": "", "tooltip": "What the video should show. KineFlow's shipped tiny models know only the words of their training captions (listed in their model cards): synonyms are rewritten into them, other words are named in a console warning."}),
            "negative_prompt": ("STRING", {"multiline": True, "default": "", "tooltip": "What to steer away from (empty = the unconditional prompt); used only when the sampler's cfg is not 1."}),
        }}

    def encode(self, text_encoder, prompt, negative_prompt):
        from ..runtime import generation

        return (generation.encode_prompts(text_encoder, prompt, negative_prompt),)


class KineFlowTextEncodeImageToVideo:
    DESCRIPTION = ("HunyuanVideo-I2V's prompt with the image in it: the first frame goes through LLaVA's CLIP vision "
                   "encoder (Load CLIP Vision; resized and centre-cropped to 336 px) and its 576 image tokens take the "
                   "<image> place of HunyuanVideo-I2V's prompt template, so the model reads the picture as its text "
                   "encoder was trained to. Every image_interleave-th image token is kept, in front of the prompt's. "
                   "The negative prompt is encoded with the image too. Connect it to Image To Video (same image) and on "
                   "to the Sampler; needs LLaVA-LLaMA-3's tokenizer (it has the <image> token).")
    CATEGORY = "KineFlow/conditioning"
    RETURN_TYPES = ("KINEFLOW_CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder": ("KINEFLOW_TEXT_ENCODER", {"tooltip": "From Load Text Encoders: HunyuanVideo-I2V's LLaVA-LLaMA-3 language model (with its tokenizer) and CLIP-L."}),
            "clip_vision": ("KINEFLOW_CLIP_VISION", {"tooltip": "From Load CLIP Vision: LLaVA's image encoder (llava_llama3_vision.safetensors)."}),
            "image": ("IMAGE", {"tooltip": "The first frame (of a batch, only the first image is used); the same image Image To Video starts the video from."}),
            "prompt": ("STRING", {"multiline": True, "default": "", "tooltip": "What the video should show."}),
            "negative_prompt": ("STRING", {"multiline": True, "default": "", "tooltip": "What to steer away from (empty = the unconditional prompt); used only when the sampler's cfg is not 1."}),
            "image_interleave": ("INT", {"default": 2, "min": 1, "max": 576, "step": 1, "tooltip": "Keep every n-th of the 576 image tokens (ComfyUI's image_interleave, diffusers' image_embed_interleave): 2 (the default of HunyuanVideo-I2V and diffusers) keeps 288; higher lets the text weigh more against the image, 1 keeps all."}),
        }}

    def encode(self, text_encoder, clip_vision, image, prompt, negative_prompt, image_interleave):
        from ..runtime import generation

        return (generation.encode_image_prompts(text_encoder, clip_vision, image, prompt, negative_prompt,
                                                image_interleave),)


class KineFlowEmptyVideoLatent:
    DESCRIPTION = ("An empty latent video to sample into. hunyuan_video latents have 16 channels, 1 latent frame per "
                   "4 video frames after the first (so frames = 4k+1) and 1/8 of the size; sd15 (AnimateDiff) latents "
                   "have 4 channels, one per frame.")
    CATEGORY = "KineFlow/latent"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    FUNCTION = "generate"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "width": ("INT", {"default": 64, "min": 16, "max": MAX_SIZE, "step": 16, "tooltip": "Video width in pixels, a multiple of 16."}),
            "height": ("INT", {"default": 64, "min": 16, "max": MAX_SIZE, "step": 16, "tooltip": "Video height in pixels, a multiple of 16."}),
            "frames": ("INT", {"default": 9, "min": 1, "max": 1025, "step": 1, "tooltip": "Number of video frames: 4k+1 for hunyuan_video (1, 5, 9, ... 129); any count for sd15."}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 64, "step": 1, "tooltip": "Videos generated at once (seeds seed, seed+1, ...)."}),
        }, "optional": {
            "latent_format": (list(LATENT_FORMATS), {"default": "hunyuan_video", "tooltip": "Which model family the latent is for."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, width=None, height=None, frames=None, batch_size=None, latent_format="hunyuan_video"):
        return check_video_size(cls, latent_format, width, height, frames, batch_size, latent_format=latent_format)

    def generate(self, width, height, frames, batch_size, latent_format="hunyuan_video"):
        from ..runtime import generation

        return (generation.empty_latent(latent_format, width, height, frames, batch_size),)


class KineFlowSampler:
    DESCRIPTION = ("Denoises a latent video with the model. Flow-matching models (HunyuanVideo) use shift and "
                   "embedded guidance; cfg above 1 adds a negative-prompt pass. denoise below 1 keeps part of "
                   "the input latent (video-to-video). While it samples, the node plays an animated preview of the "
                   "current estimate, every frame of it.")
    CATEGORY = "KineFlow/sampling"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("KINEFLOW_VIDEO_MODEL", {"tooltip": "From Load Video Model (HunyuanVideo) or Load SD Checkpoint + Apply Motion Module (AnimateDiff)."}),
            "conditioning": ("KINEFLOW_CONDITIONING", {"tooltip": "From Text Encode, Prompt Schedule or Image To Video."}),
            "latent": ("LATENT", {"tooltip": "Empty Video Latent, Image To Video's latent, or a VAE Encode output for video-to-video."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "step": 1, "tooltip": "Noise seed; the same seed gives the same video on any device."}),
            "steps": ("INT", {"default": 8, "min": 1, "max": 200, "step": 1, "tooltip": "Sampling steps."}),
            "cfg": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 30.0, "step": 0.1, "tooltip": "Classifier-free guidance scale against the negative prompt; 1 = off (one model pass per step, fastest)."}),
            "shift": ("FLOAT", {"default": 7.0, "min": 0.01, "max": 100.0, "step": 0.01, "tooltip": "Flow-matching time shift: higher spends more steps at high noise (HunyuanVideo uses 7 at 720p)."}),
            "embedded_guidance": ("FLOAT", {"default": 6.0, "min": 0.0, "max": 100.0, "step": 0.1, "tooltip": "Guidance strength fed to guidance-distilled models as an input (ignored by models without it)."}),
            "sampler_name": (list(SAMPLER_NAMES), {"default": "euler", "tooltip": "Sampling algorithm."}),
            "scheduler": (list(SCHEDULER_NAMES), {"default": "default", "tooltip": "default: the family's own schedule (shifted flow matching for HunyuanVideo, AnimateDiff's DDPM spacing); karras: Karras sigmas (discrete-schedule models only)."}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "1 = from pure noise; lower keeps that much of the input latent."}),
        }, "optional": {
            "context_options": ("KINEFLOW_CONTEXT_OPTIONS", {"tooltip": "Sliding context windows for videos longer than the model's window."}),
            "step_cache": ("KINEFLOW_STEP_CACHE", {"tooltip": "From Step Cache: skip the model's blocks on steps where they would change little (faster, slightly different video)."}),
            "parallel": ("KINEFLOW_PARALLEL", {"tooltip": "From Parallel Options: how a run over several processes (kineflow run --nproc N, or this process plus the worker devices Parallel Options lists) splits the transformer."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, cfg=None, shift=None, embedded_guidance=None, denoise=None):
        # Named so that ComfyUI hands them here: its own checks let NaN through. check_declared makes those checks.
        return check_declared(cls, cfg=cfg, shift=shift, embedded_guidance=embedded_guidance, denoise=denoise)

    def sample(self, model, conditioning, latent, seed, steps, cfg, shift, embedded_guidance, sampler_name,
               scheduler, denoise, context_options=None, step_cache=None, parallel=None):
        from ..runtime import generation

        return (generation.sample_video(model, conditioning, latent, seed=seed, steps=steps, cfg=cfg, shift=shift,
                                        embedded_guidance=embedded_guidance, sampler_name=sampler_name,
                                        scheduler=scheduler, denoise=denoise, context=context_options,
                                        step_cache=step_cache, parallel=parallel),)


class KineFlowContextOptions:
    DESCRIPTION = ("Sliding context windows over latent frames: the model sees at most `length` frames at a time "
                   "and overlapping windows are blended, so memory stays bounded for long videos.")
    CATEGORY = "KineFlow/sampling"
    RETURN_TYPES = ("KINEFLOW_CONTEXT_OPTIONS",)
    RETURN_NAMES = ("context_options",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "length": ("INT", {"default": 16, "min": 1, "max": 512, "step": 1, "tooltip": "Latent frames per window."}),
            "overlap": ("INT", {"default": 4, "min": 0, "max": 511, "step": 1, "tooltip": "Latent frames shared by neighbouring windows."}),
            "stride": ("INT", {"default": 1, "min": 1, "max": 16, "step": 1, "tooltip": "Largest frame stride: above 1 adds dilated windows that link distant frames."}),
            "schedule": (["uniform", "static", "looped"], {"default": "uniform", "tooltip": "uniform: sliding windows; static: fixed consecutive windows; looped: windows wrap around for a seamless loop."}),
            "fuse_method": (["pyramid", "flat", "overlap-linear"], {"default": "pyramid", "tooltip": "How overlapping windows are weighted when blended."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, length=None, overlap=None):
        declared = check_declared(cls, length=length, overlap=overlap)
        if declared is not True or length is None or overlap is None:
            return declared
        return context_problem(length, overlap, stride=1) or True

    def build(self, length, overlap, stride, schedule, fuse_method):
        from ..samplers.context import ContextOptions

        return (ContextOptions(length=length, overlap=overlap, stride=stride, schedule=schedule, fuse_method=fuse_method),)


class KineFlowStepCache:
    DESCRIPTION = ("Step caching for the Sampler: on steps where the model's output would change little, most of "
                   "the model is skipped and what it added at the last full step is reused. HunyuanVideo uses "
                   "TeaCache (the change of the first block's input, rescaled by the model's fitted polynomial, "
                   "summed since the last full step); SD1.5/AnimateDiff a first-block cache (the change of the first "
                   "block's output since the last full step). The first and last steps always run in full.")
    CATEGORY = "KineFlow/sampling"
    RETURN_TYPES = ("KINEFLOW_STEP_CACHE",)
    RETURN_NAMES = ("step_cache",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "threshold": ("FLOAT", {"default": DEFAULT_STEP_CACHE_THRESHOLD, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "How much estimated change the model's skipped steps may add up to: higher skips more steps (faster) and departs further from the uncached video; 0 never skips."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, threshold=None):
        return check_declared(cls, threshold=threshold)

    def build(self, threshold):
        from ..samplers.step_cache import StepCacheOptions

        return (StepCacheOptions(threshold=threshold),)


_TILING_INPUTS = {
    "tiling": (["auto", "enabled", "disabled"], {"default": "auto", "tooltip": "auto: tile only when the whole video would not fit a memory budget; enabled: always use the tile sizes below."}),
    "tile_size": ("INT", {"default": 256, "min": 64, "max": 4096, "step": 32, "tooltip": "Spatial tile size in pixels (multiple of 8)."}),
    "tile_overlap": ("INT", {"default": 64, "min": 0, "max": 2048, "step": 8, "tooltip": "Pixels shared by neighbouring tiles, blended linearly (at most half a tile)."}),
    "tile_frames": ("INT", {"default": 16, "min": 4, "max": 1024, "step": 4, "tooltip": "Temporal tile length in frames (multiple of 4)."}),
    "frame_overlap": ("INT", {"default": 4, "min": 0, "max": 512, "step": 4, "tooltip": "Frames shared by neighbouring temporal tiles (multiple of 4)."}),
}


def _check_tiling(cls, tiling, tile_size, tile_overlap, tile_frames, frame_overlap) -> bool | str:
    """VALIDATE_INPUTS of VAE Decode / Encode: the tiles the VAE would refuse once sampling is done, refused now."""
    tiles = dict(tile_size=tile_size, tile_overlap=tile_overlap, tile_frames=tile_frames, frame_overlap=frame_overlap)
    declared = check_declared(cls, tiling=tiling, **tiles)
    if declared is not True or tiling != "enabled" or None in tiles.values():
        return declared
    return tiling_problem(**tiles) or True


class KineFlowVAEDecode:
    DESCRIPTION = "Decodes a latent video to frames (IMAGE), optionally in tiles over space and time to bound memory."
    CATEGORY = "KineFlow/vae"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": ("KINEFLOW_VAE", {"tooltip": "From Load Video VAE or Load SD Checkpoint."}),
            "latent": ("LATENT", {"tooltip": "The sampled latent video."}),
            **_TILING_INPUTS,
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, tiling=None, tile_size=None, tile_overlap=None, tile_frames=None, frame_overlap=None):
        return _check_tiling(cls, tiling, tile_size, tile_overlap, tile_frames, frame_overlap)

    def decode(self, vae, latent, tiling, tile_size, tile_overlap, tile_frames, frame_overlap):
        from ..runtime import generation

        options = generation.tiling_options(tiling, tile_size, tile_overlap, tile_frames, frame_overlap)
        return (generation.decode_video(vae, latent, options),)


class KineFlowVAEEncode:
    DESCRIPTION = "Encodes frames (4k+1 of them, sides multiples of 16) into a latent video, e.g. for video-to-video."
    CATEGORY = "KineFlow/vae"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": ("KINEFLOW_VAE", {"tooltip": "From Load Video VAE or Load SD Checkpoint."}),
            "images": ("IMAGE", {"tooltip": "Frames to encode."}),
            **_TILING_INPUTS,
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, tiling=None, tile_size=None, tile_overlap=None, tile_frames=None, frame_overlap=None):
        return _check_tiling(cls, tiling, tile_size, tile_overlap, tile_frames, frame_overlap)

    def encode(self, vae, images, tiling, tile_size, tile_overlap, tile_frames, frame_overlap):
        from ..runtime import generation

        options = generation.tiling_options(tiling, tile_size, tile_overlap, tile_frames, frame_overlap)
        return (generation.encode_video(vae, images, options),)


class KineFlowImageToVideo:
    DESCRIPTION = ("Starts an image-to-video run from a first frame: the image is centre-cropped to the video's "
                   "aspect ratio, resized to width x height and VAE-encoded. HunyuanVideo (Load Video VAE's VAE): the "
                   "Sampler gives the model that latent at every step (concatenated channels for HunyuanVideo-I2V "
                   "33ch and SkyReels-V1, the clean first latent frame for HunyuanVideo-I2V's token-replace release), "
                   "to the negative prompt too; the latent output is empty. For HunyuanVideo-I2V's image tokens in the "
                   "prompt, make the conditioning with Text Encode (Image To Video) from the same image. AnimateDiff (the SD "
                   "checkpoint's VAE): the Sampler keeps latent frame 0 on the image, noised to each step's level, and "
                   "the motion module carries it into the other frames; the latent output holds the image in every "
                   "frame, so a Sampler denoise below 1 (e.g. 0.8) also starts the other frames from it.")
    CATEGORY = "KineFlow/conditioning"
    RETURN_TYPES = ("KINEFLOW_CONDITIONING", "LATENT")
    RETURN_NAMES = ("conditioning", "latent")
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "conditioning": ("KINEFLOW_CONDITIONING", {"tooltip": "From Text Encode, Text Encode (Image To Video) or Prompt Schedule: the prompt and negative prompt."}),
            "vae": ("KINEFLOW_VAE", {"tooltip": "Encodes the first frame: HunyuanVideo's VAE (Load Video VAE) for HunyuanVideo models, the SD checkpoint's VAE for AnimateDiff."}),
            "image": ("IMAGE", {"tooltip": "The first frame (of a batch, only the first image is used); centre-cropped to the aspect of width x height, then resized to it."}),
            "width": ("INT", {"default": 64, "min": 16, "max": MAX_SIZE, "step": 16, "tooltip": "Video width in pixels, a multiple of 16."}),
            "height": ("INT", {"default": 64, "min": 16, "max": MAX_SIZE, "step": 16, "tooltip": "Video height in pixels, a multiple of 16."}),
            "frames": ("INT", {"default": 9, "min": 1, "max": 1025, "step": 1, "tooltip": "Number of video frames, the first being the image: 4k+1 (1, 5, 9, ... 129) for HunyuanVideo, any count for AnimateDiff (16 is its context length)."}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 64, "step": 1, "tooltip": "Videos generated at once from the same image (seeds seed, seed+1, ...)."}),
            "mode": (list(IMAGE_CONDITION_MODES), {"default": "auto", "tooltip": "auto: as the model's file says (HunyuanVideo-I2V 33ch: image latent + mask channels; SkyReels-V1: image latent channels; AnimateDiff: the first frame kept). token_replace: HunyuanVideo-I2V's token-replace release, whose 16-channel file looks like text to video (ComfyUI's 'v2 (replace)')."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, width=None, height=None, frames=None, batch_size=None, mode=None):
        # The family (HunyuanVideo's 4k+1 frames) follows from the VAE, known when the node runs; here the checks
        # both families share, and the memory of the larger (per-frame SD) latent.
        return check_video_size(cls, "sd15", width, height, frames, batch_size, mode=mode)

    def build(self, conditioning, vae, image, width, height, frames, batch_size, mode):
        from ..runtime import generation

        return generation.image_to_video(conditioning, vae, image, width, height, frames, batch_size, mode)


NODE_CLASS_MAPPINGS = {
    "KineFlowTextEncode": KineFlowTextEncode,
    "KineFlowTextEncodeImageToVideo": KineFlowTextEncodeImageToVideo,
    "KineFlowEmptyVideoLatent": KineFlowEmptyVideoLatent,
    "KineFlowSampler": KineFlowSampler,
    "KineFlowContextOptions": KineFlowContextOptions,
    "KineFlowStepCache": KineFlowStepCache,
    "KineFlowVAEDecode": KineFlowVAEDecode,
    "KineFlowVAEEncode": KineFlowVAEEncode,
    "KineFlowImageToVideo": KineFlowImageToVideo,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "KineFlowTextEncode": "Text Encode (KineFlow)",
    "KineFlowTextEncodeImageToVideo": "Text Encode (Image To Video) (KineFlow)",
    "KineFlowEmptyVideoLatent": "Empty Video Latent (KineFlow)",
    "KineFlowSampler": "Sampler (KineFlow)",
    "KineFlowContextOptions": "Context Options (KineFlow)",
    "KineFlowStepCache": "Step Cache (KineFlow)",
    "KineFlowVAEDecode": "VAE Decode (KineFlow)",
    "KineFlowVAEEncode": "VAE Encode (KineFlow)",
    "KineFlowImageToVideo": "Image To Video (KineFlow)",
}
