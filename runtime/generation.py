"""The work behind the generation nodes: prompt encoding, empty latents, sampling, VAE decode and encode.

Each function takes model handles (runtime/video_models.py) and plain values, reports progress and previews
through the host, and returns ComfyUI-shaped values (LATENT dicts, IMAGE tensors).
"""

from __future__ import annotations

import logging

import torch

from ..models.hunyuan_video_vae import TilingOptions
from ..samplers.context import ContextOptions, context_window_denoiser
from ..samplers.guidance import first_frame_denoiser, make_cfg_denoiser
from ..samplers.noise import seeded_noise, step_generators
from ..samplers.prompt_schedule import latent_frame_weights, parse_schedule
from ..samplers.prompt_travel import TravelDenoiser
from ..samplers.sampling import sample
from ..samplers.step_cache import StepCacheOptions, StepCacheRun
from ..shapes.vocabulary import Vocabulary, unknown_words_message
from . import distributed, host, previews
from ..errors import KineFlowError
from .latent_formats import IMAGE_CONDITION_MODES, LATENT_FORMATS, check_video_size, video_memory_problem

log = logging.getLogger(__name__)


def empty_latent(format_name: str, width: int, height: int, frames: int, batch: int) -> dict:
    problem = check_video_size(format_name, width, height, frames) or video_memory_problem(
        format_name, width, height, frames, batch, host.read_budget(), host.RAISE_BUDGET)
    if problem:
        raise KineFlowError(problem)
    fmt = LATENT_FORMATS[format_name]
    return {"samples": torch.zeros(fmt.latent_shape(batch, frames, height, width)), "latent_format": fmt.name}


# --------------------------------------------------------------------------- text
def encode_prompts(text_encoder, prompt: str, negative_prompt: str = "") -> dict:
    """KINEFLOW_CONDITIONING: the encoded prompt and negative prompt. As in ComfyUI, an empty negative prompt is
    encoded too: it is the unconditional branch CFG pushes away from (models are trained with empty captions).
    For a shipped tiny model, both are first put into the words it knows (`for_shipped_model`)."""
    if text_encoder is None:  # encode_schedule comes here first
        raise KineFlowError("no text encoder reached this node: Load LoRA's text_encoder output carries text encoders "
                            "only when its text_encoders input is connected (to Load Text Encoders)")
    if text_encoder.vocabulary is not None:
        prompt, negative_prompt = (for_shipped_model(text_encoder.vocabulary, p) for p in (prompt, negative_prompt))
    with torch.inference_mode():
        positive, negative = text_encoder.encode([prompt]), text_encoder.encode([negative_prompt])
    return {"positive": positive, "negative": negative}


def encode_image_prompts(text_encoder, clip_vision, image: torch.Tensor, prompt: str, negative_prompt: str = "",
                         image_interleave: int = 2) -> dict:
    """KINEFLOW_CONDITIONING for HunyuanVideo-I2V with the image in the prompt: the first IMAGE frame becomes LLaVA's
    image tokens (Load CLIP Vision), which take the `<image>` place of HunyuanVideo-I2V's prompt template; every
    `image_interleave`-th is kept (models/hunyuan_text.py). The negative prompt is encoded with the image too, as the
    reference pipelines do. Otherwise as `encode_prompts` (an empty negative prompt is encoded; a shipped tiny
    model's words)."""
    if text_encoder is None:
        raise KineFlowError("no text encoder reached this node: connect Load Text Encoders")
    if not hasattr(text_encoder, "encode_with_image"):
        raise KineFlowError("Text Encode (Image To Video) puts the image into HunyuanVideo-I2V's LLaVA prompt; this text "
                            "encoder (the SD checkpoint's CLIP, AnimateDiff) takes no image: use Text Encode")
    if image.ndim != 4 or image.shape[-1] < 3 or image.shape[0] < 1:
        raise KineFlowError(f"expected an IMAGE [frames, H, W, 3]; found shape {tuple(image.shape)}")
    if text_encoder.vocabulary is not None:
        prompt, negative_prompt = (for_shipped_model(text_encoder.vocabulary, p) for p in (prompt, negative_prompt))
    with torch.inference_mode():
        tokens = clip_vision.encode(image)
        positive = text_encoder.encode_with_image([prompt], tokens, image_interleave)
        negative = text_encoder.encode_with_image([negative_prompt], tokens, image_interleave)
    return {"positive": {k: to_cpu(v) for k, v in positive.items()},
            "negative": {k: to_cpu(v) for k, v in negative.items()}}


def encode_schedule(text_encoder, schedule: str, negative_prompt: str = "") -> dict:
    """KINEFLOW_CONDITIONING for prompt travel: `encode_prompts` of the first keyframe's prompt (so the conditioning
    also works where a schedule is not read), plus "travel": the parsed schedule and each keyframe's encoding. The
    Sampler interpolates them per latent frame (samplers/prompt_travel.py)."""
    parsed = parse_schedule(schedule)
    conditioning = encode_prompts(text_encoder, parsed.prompts[0], negative_prompt)
    encoded = [conditioning["positive"]]
    for prompt in parsed.prompts[1:]:
        if text_encoder.vocabulary is not None:
            prompt = for_shipped_model(text_encoder.vocabulary, prompt)
        with torch.inference_mode():
            encoded.append(text_encoder.encode([prompt]))
    conditioning["travel"] = {"schedule": parsed, "encoded": encoded}
    return conditioning


def _travel_denoiser(model, conditioning: dict, latent_frames: int, net_fn, negative, cfg: float,
                     embedded_guidance: float, batch: int, device, image_kwargs: dict) -> TravelDenoiser | None:
    """The denoiser of a prompt-travel run (None without a schedule): the keyframes' prompts interpolated per latent
    frame, keyframes given in video frames (see samplers/prompt_schedule.py for the latent-frame mapping).
    `image_kwargs` (Image To Video's, on the device) go with every keyframe's prompt."""
    travel = conditioning.get("travel")
    if travel is None:
        return None
    weights = latent_frame_weights(travel["schedule"], latent_frames, model.latent_format.temporal_ratio)
    keyed = [{**_on(device, model.net_kwargs(_batched(encoded, batch), embedded_guidance, batch)), **image_kwargs}
             for encoded in travel["encoded"]]
    return TravelDenoiser(model.model_sampling.wrap(net_fn), keyed, negative, cfg, weights,
                          frame_text=getattr(model, "frame_text", False))


def for_shipped_model(vocabulary: Vocabulary, prompt: str) -> str:
    """`prompt` with the synonyms a shipped tiny model does not know rewritten into words it does (logged), and a
    logged warning naming the words still unknown, which the model would read as nothing."""
    normalized, replaced = vocabulary.normalize(prompt)
    if replaced:
        log.info("KineFlow: prompt %r read as %r for the shipped tiny model (%s)", prompt, normalized,
                 ", ".join(f"{word!r} -> {phrase!r}" for word, phrase in replaced))
    unknown = vocabulary.unknown_words(normalized)
    if unknown:
        log.warning("KineFlow: %s", unknown_words_message(prompt, unknown))
    return normalized


def _batched(cond: dict, batch: int) -> dict:
    return {k: v.expand(batch, *v.shape[1:]) if isinstance(v, torch.Tensor) and v.shape[0] == 1 else v
            for k, v in cond.items()}


def _on(device: torch.device, values: dict) -> dict:
    """The floating-point tensors of a keyword dict moved to `device` (once per sampling run, not per step).

    Integer and boolean tensors (token masks) stay where the text encoder put them, on the CPU: models take
    their control-flow decisions (how many tokens to keep) from them without a device sync."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in values.items()}


def to_cpu(tensor: torch.Tensor) -> torch.Tensor:
    """Node outputs live on the CPU between nodes (ComfyUI's convention); a dry run's `meta` tensors stay shapes."""
    return tensor if tensor.is_meta else tensor.cpu()


# --------------------------------------------------------------------------- sampling
def sample_video(
    model,
    conditioning: dict,
    latent: dict,
    *,
    seed: int,
    steps: int,
    cfg: float,
    shift: float,
    embedded_guidance: float,
    sampler_name: str,
    scheduler: str = "default",
    denoise: float = 1.0,
    context: ContextOptions | None = None,
    step_cache: StepCacheOptions | None = None,
    parallel=None,
) -> dict:
    """Denoise `latent` under `conditioning`; denoise < 1 starts from the input latent (video-to-video).
    `step_cache` skips the model's blocks on steps where they would change little (samplers/step_cache.py).
    In a run over several processes the work is split over them (runtime/distributed.py); `parallel`
    (distributed.Degrees, from Parallel Options) sets the degrees; with worker devices, this process and workers on
    those devices split it (runtime/workers.py)."""
    if parallel is not None and parallel.devices and not host.is_dry_run():
        from . import workers

        return workers.sample_video(model, conditioning, latent, parallel, seed=seed, steps=steps, cfg=cfg,
                                    shift=shift, embedded_guidance=embedded_guidance, sampler_name=sampler_name,
                                    scheduler=scheduler, denoise=denoise, context=context, step_cache=step_cache)
    samples = latent["samples"]
    fmt = model.latent_format
    if samples.ndim != 5 or samples.shape[1] != fmt.channels:
        raise KineFlowError(
            f"the {model.family} model expects a latent [B, {fmt.channels}, T, H, W]; found shape {tuple(samples.shape)}. "
            f"Use an Empty Video Latent with latent_format {fmt.name!r} or a VAE Encode of the same family."
        )
    batch = samples.shape[0]
    device = host.compute_device()
    # Noise is drawn on the CPU from the seed (one seed, one video on every device), then moved.
    noise = seeded_noise(samples.shape, seed, device=device)
    sigmas = model.sigmas(steps, shift, denoise, scheduler)
    if noise.is_meta and len(sigmas) > 3:
        # A dry run: every step has the same shapes, so the first two (the second uses a multistep sampler's
        # history) and the last show the memory of all of them.
        sigmas = torch.cat([sigmas[:2], sigmas[-2:]])
    start = samples.to(device=device, dtype=torch.float32) if denoise < 1.0 else None

    image_kwargs, image_mode = _image_condition(model, conditioning.get("image"), tuple(samples.shape), context)
    image_kwargs = _on(device, image_kwargs)
    positive = _on(device, model.net_kwargs(_batched(conditioning["positive"], batch), embedded_guidance, batch))
    positive.update(image_kwargs)
    negative = None
    if conditioning.get("negative") is not None:
        negative = _on(device, model.net_kwargs(_batched(conditioning["negative"], batch), embedded_guidance, batch))
        negative.update(image_kwargs)  # as the reference pipelines: the unconditional branch sees the image too
    net_fn, cache = model.net_fn, None
    if step_cache is not None:
        cache = StepCacheRun(step_cache, model.step_cache_criterion, steps=len(sigmas) - 1)
        net_fn = cache.bind(net_fn)
    travel = _travel_denoiser(model, conditioning, samples.shape[2], net_fn, negative, cfg, embedded_guidance,
                              batch, device, image_kwargs)
    denoiser = travel or make_cfg_denoiser(model.model_sampling.wrap(net_fn), positive, negative, cfg)
    if context is not None:
        denoiser = context_window_denoiser(denoiser, context, group=distributed.window_group(model))
    if image_mode in ("token_replace", "first_frame"):
        first = conditioning["image"]["latent"].expand(batch, -1, -1, -1, -1).to(device=device, dtype=torch.float32)
        noised = None
        if image_mode == "first_frame":  # the image noised to each step's sigma, with the seed's frame-0 noise
            noised = lambda sigma: model.model_sampling.noise_scaling(  # noqa: E731
                sigma.to(first).view(-1, 1, 1, 1, 1), noise[:, :, :1], first)
        denoiser = first_frame_denoiser(denoiser, first, noised)
    if cache is not None:
        denoiser = cache.wrap(denoiser)

    bar = host.progress(len(sigmas) - 1, "sampling")

    def callback(step, total, x, denoised):
        with distributed.step_agreement():  # with workers, every rank stops at the step where rank 0 stopped
            preview = None
            if bar.shows_previews and not denoised.is_meta and budget.due():
                with budget.spending():
                    preview = previews.animated_preview(denoised, *model.preview_factors, fmt.temporal_ratio).message()
            bar.update(1, preview=preview)

    guided = negative is not None and cfg != 1.0
    with model.running(), distributed.parallel_sampling(model, guided, context is not None, parallel):
        budget = previews.PreviewBudget()
        out = sample(model.model_sampling, denoiser, noise, sigmas, sampler_name, start,
                     generator=step_generators(seed, batch), callback=callback)
    if cache is not None:
        log.info("KineFlow: step cache (%s, threshold %g) skipped the model's blocks in %d of %d calls",
                 cache.criterion.name, cache.threshold, cache.skips, cache.calls)
    return {"samples": to_cpu(out), "latent_format": fmt.name}


def _image_condition(model, image: dict | None, latent_shape: tuple[int, ...], context) -> tuple[dict, str | None]:
    """The model's keyword arguments for Image To Video's first frame (none without one) and the mode they run
    (None, "latent_concat", "token_replace" or, for AnimateDiff, "first_frame"). On a HunyuanVideo model context
    windows would give every window the first frame's place, so the two are refused together; AnimateDiff's first
    frame is pinned in the whole video's estimate, after the windows are merged."""
    if getattr(model, "image_kwargs", None) is None:  # AnimateDiff
        if image is None:
            return {}, None
        if image["mode"] != "first_frame":
            raise KineFlowError(f"this Image To Video conditioning was made with HunyuanVideo's VAE; the {model.family} "
                                "model needs it from its own VAE (the SD checkpoint's)")
        b, c, _, h, w = latent_shape
        first = image["latent"]
        if tuple(first.shape[1:]) != (c, 1, h, w) or first.shape[0] not in (1, b):
            raise KineFlowError(f"Image To Video's image latent {tuple(first.shape)} does not fit the latent "
                                f"{tuple(latent_shape)}; expected [1 or {b}, {c}, 1, {h}, {w}] (use the latent "
                                "Image To Video gives, or the same size)")
        return {}, "first_frame"
    if image is not None and image["mode"] == "first_frame":
        raise KineFlowError(f"this Image To Video conditioning was made with an SD VAE (AnimateDiff); the "
                            f"{model.family} model needs it from HunyuanVideo's VAE (Load Video VAE)")
    kwargs, mode = model.image_kwargs(image, latent_shape)
    if mode is not None and context is not None:
        raise KineFlowError("image to video with context windows is not supported: the first frame belongs to the "
                            "first window only, which the windows do not model yet; disconnect Context Options "
                            "(or sample without Image To Video)")
    return kwargs, mode


def image_to_video(conditioning: dict, vae, image: torch.Tensor, width: int, height: int, frames: int, batch: int,
                   mode: str) -> tuple[dict, dict]:
    """Image To Video: (conditioning with the first frame, a latent to sample into). The first IMAGE frame is
    centre-cropped to the aspect of width x height, resized to it (bilinear, antialiased), VAE-encoded as a
    one-frame video (posterior mean, scaled) and kept as {"latent": [1, C, 1, H/8, W/8], "mode": mode}.

    With HunyuanVideo's VAE the Sampler hands it to the model each step (see HunyuanVideoModel.image_kwargs) and
    the latent is empty. With an SD VAE (AnimateDiff) the mode is "first_frame": the Sampler pins latent frame 0 to
    the image at every step (the motion module makes the other frames follow it), and the latent holds the image in
    every frame, so that a denoise < 1 also starts the other frames from it."""
    from .media import resize_frames

    family = vae.latent_format.name
    if mode not in IMAGE_CONDITION_MODES:
        raise KineFlowError(f"mode must be one of {', '.join(IMAGE_CONDITION_MODES)}; got {mode!r}")
    if family != "hunyuan_video" and mode != "auto":
        raise KineFlowError(f"mode {mode} is for HunyuanVideo image-to-video models; with this VAE ({family} latents, "
                            "AnimateDiff) set mode to auto")
    if conditioning.get("positive") is None:
        raise KineFlowError("Image To Video's conditioning has no prompt; connect Text Encode's output")
    latent = empty_latent(family, width, height, frames, batch)
    first = resize_frames(image[:1, :, :, :3], width, height, "bilinear", "center")
    encoded = encode_video(vae, first, "auto")["samples"]
    if family == "hunyuan_video":
        return {**conditioning, "image": {"latent": encoded, "mode": mode}}, latent
    latent["samples"] = encoded.expand_as(latent["samples"]).clone()
    return {**conditioning, "image": {"latent": encoded, "mode": "first_frame"}}, latent


# --------------------------------------------------------------------------- VAE
def _vae_progress(desc: str):
    bar = None

    def callback(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = host.progress(total, desc)
        bar.update(done - bar.current)

    return callback


def tiling_options(mode: str, tile_size: int, tile_overlap: int, tile_frames: int, frame_overlap: int):
    """Node inputs -> the VAE's tiling argument: "auto" (from a memory budget), None (off) or explicit tiles."""
    if mode == "auto":
        return "auto"
    if mode == "disabled":
        return None
    return TilingOptions(tile_size=tile_size, tile_overlap=tile_overlap, tile_frames=tile_frames,
                         frame_overlap=frame_overlap)


def _vae_budget(device) -> int:
    """Half of what is free now: leaves room for the frames being assembled and for other work."""
    return host.free_memory(device) // 2


def decode_video(vae, latent: dict, tiling) -> torch.Tensor:
    """LATENT -> IMAGE [B*F, H, W, 3] in 0..1 (the videos of a batch one after another)."""
    samples = latent["samples"]
    if samples.ndim != 5 or samples.shape[1] != vae.latent_format.channels:
        raise KineFlowError(f"this VAE decodes latents [B, {vae.latent_format.channels}, T, H, W]; found shape {tuple(samples.shape)}")
    device = host.compute_device()
    with torch.inference_mode():
        video = vae.decode(samples.to(device), tiling, _vae_budget(device), _vae_progress("VAE decode"),
                           **distributed.decode_options())
    frames = ((to_cpu(video.float()) + 1.0) / 2.0).clamp(0, 1)  # [B, 3, F, H, W]
    return frames.permute(0, 2, 3, 4, 1).reshape(-1, *frames.shape[3:], 3).contiguous()


def encode_video(vae, images: torch.Tensor, tiling) -> dict:
    """IMAGE [F, H, W, 3] -> LATENT [1, C, T, H/8, W/8] (posterior mean, scaled)."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise KineFlowError(f"expected IMAGE frames [F, H, W, 3]; found shape {tuple(images.shape)}")
    fmt = vae.latent_format
    frames, height, width = images.shape[0], images.shape[1], images.shape[2]
    problem = check_video_size(fmt.name, width, height, frames)
    if problem:
        raise KineFlowError(f"cannot encode these frames: {problem}. Trim or resize them first (Select Frames, Resize Frames).")
    video = images.permute(3, 0, 1, 2).unsqueeze(0) * 2.0 - 1.0
    device = host.compute_device()
    with torch.inference_mode():
        latents = vae.encode(video.to(device), tiling, _vae_budget(device), _vae_progress("VAE encode"))
    return {"samples": to_cpu(latents.float()), "latent_format": fmt.name}
