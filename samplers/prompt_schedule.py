"""Prompt travel schedules: parsing and the per-frame interpolation weights (plain Python, no torch).

Syntax (AnimateDiff-Evolved's / FizzNodes' "batch prompt schedule"): one keyframe per line, a video frame index in
quotes, a colon and the prompt in quotes, lines separated by commas; the surrounding braces are optional and a
trailing comma is allowed:

    "0": "a red circle moves to the right on a blue background",
    "8": "a green circle moves to the right on a blue background"

Keys are frame numbers (0, 1, ...) in increasing order, each once; prompts are JSON strings. KineFlow refuses what
FizzNodes would reorder, drop or evaluate silently (unsorted or duplicate keys, `max_f/2`-style expressions), and a
keyframe beyond the video (checked when the video's length is known, at sampling).

Interpolation (FizzNodes' `interpolate_prompt_series` + ComfyUI's conditioning average, which ADE's travel uses):
for video frame f between keyframes k_i <= f < k_(i+1) the conditioning is

    cond(f) = (1 - a) * cond_i + a * cond_(i+1),    a = (f - k_i) / (k_(i+1) - k_i)

so frame k_(i+1) has exactly prompt i+1. Frames before the first keyframe hold the first prompt (FizzNodes inserts a
keyframe 0 with it), frames after the last keyframe hold the last prompt. `frame_weights` gives, per video frame,
the weight of each keyframe's prompt (rows sum to 1; at most two are non-zero).

Video frames vs latent frames: keyframes are video frames. AnimateDiff latents are one per frame. HunyuanVideo's
causal VAE maps latent frame 0 to video frame 0 and latent frame t >= 1 to video frames 4t-3 .. 4t (temporal ratio
r: r(t-1)+1 .. rt). Since the interpolation is linear, a latent frame's weights are the mean of the weights of the
video frames it covers (`latent_frame_weights`), i.e. the mean of their interpolated conditionings.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from ..errors import KineFlowError

EXAMPLE = '"0": "a red circle moves to the right", "8": "a green circle moves to the right"'
_TRAILING_COMMA = re.compile(r",\s*}\s*$")


@dataclass(frozen=True)
class PromptSchedule:
    """Keyframes (video frame indices, increasing) and their prompts."""

    keyframes: tuple[int, ...]
    prompts: tuple[str, ...]

    def __post_init__(self):
        if not self.keyframes or len(self.keyframes) != len(self.prompts):
            raise KineFlowError(f"a prompt schedule needs one prompt per keyframe and at least one keyframe; found "
                                f"{len(self.keyframes)} keyframes and {len(self.prompts)} prompts")
        for before, after in zip(self.keyframes, self.keyframes[1:]):
            if after <= before:
                raise KineFlowError(f"prompt schedule keyframes must increase; found frame {after} after frame {before}")
        if self.keyframes[0] < 0:
            raise KineFlowError(f"prompt schedule keyframes are frames 0, 1, ...; found {self.keyframes[0]}")


def _keyframe(key: str) -> int:
    if not re.fullmatch(r"\s*\d+\s*", key):
        raise KineFlowError(f"prompt schedule keys must be video frame numbers such as \"0\" or \"8\"; found "
                            f"{key!r}. Expected lines like {EXAMPLE}")
    return int(key)


def parse_schedule(text: str) -> PromptSchedule:
    """The schedule in `text` (see the module docstring), or a KineFlowError saying what was expected and found."""
    if not isinstance(text, str):
        raise KineFlowError(f"the prompt schedule must be text; found {type(text).__name__} {str(text)[:40]!r}")
    if not text.strip():
        raise KineFlowError(f"the prompt schedule is empty; expected one keyframe per line, like {EXAMPLE}")
    body = text.strip()
    if not body.startswith("{"):
        body = "{" + body + "}"
    body = _TRAILING_COMMA.sub("}", body)

    def pairs_only(pairs):
        return pairs

    try:
        pairs = json.loads(body, object_pairs_hook=pairs_only)
    except json.JSONDecodeError as e:
        raise KineFlowError(f"cannot read the prompt schedule: {e.msg} near {body[max(0, e.pos - 20):e.pos + 20]!r}. "
                            f"Expected lines like {EXAMPLE} (keys and prompts in double quotes, separated by commas)"
                            ) from None
    if not isinstance(pairs, list) or not pairs:
        raise KineFlowError(f"the prompt schedule holds no keyframes; expected lines like {EXAMPLE}")
    keyframes, prompts = [], []
    for key, prompt in pairs:
        frame = _keyframe(key)
        if not isinstance(prompt, str):
            raise KineFlowError(f"the prompt of keyframe {frame} must be a string in double quotes; found "
                                f"{json.dumps(prompt)[:60]}")
        if frame in keyframes:
            raise KineFlowError(f"keyframe {frame} appears twice in the prompt schedule; each frame takes one prompt")
        if keyframes and frame < keyframes[-1]:
            raise KineFlowError(f"prompt schedule keyframes must be in increasing order; found frame {frame} after "
                                f"frame {keyframes[-1]}")
        keyframes.append(frame)
        prompts.append(prompt)
    return PromptSchedule(tuple(keyframes), tuple(prompts))


def schedule_problem(text: str) -> str | None:
    """None when `text` parses, else the error message (for VALIDATE_INPUTS)."""
    try:
        parse_schedule(text)
    except KineFlowError as e:
        return str(e)
    return None


def check_length(schedule: PromptSchedule, video_frames: int) -> None:
    """Refuse a keyframe beyond a video of `video_frames` frames."""
    last = schedule.keyframes[-1]
    if last >= video_frames:
        raise KineFlowError(f"prompt schedule keyframe {last} is beyond the video: it has {video_frames} frames "
                            f"(0..{video_frames - 1}); expected keyframes below {video_frames}")


def frame_weights(schedule: PromptSchedule, video_frames: int) -> list[list[float]]:
    """Per video frame, the weight of each keyframe's prompt (see the module docstring)."""
    check_length(schedule, video_frames)
    keys, k = schedule.keyframes, len(schedule.keyframes)
    rows = []
    for f in range(video_frames):
        row = [0.0] * k
        if f <= keys[0]:
            row[0] = 1.0
        elif f >= keys[-1]:
            row[-1] = 1.0
        else:
            i = max(j for j in range(k) if keys[j] <= f)
            a = (f - keys[i]) / (keys[i + 1] - keys[i])
            row[i], row[i + 1] = 1.0 - a, a
        rows.append(row)
    return rows


def covered_frames(latent_frame: int, temporal_ratio: int) -> range:
    """The video frames a latent frame decodes to (ratio 1: itself; HunyuanVideo's 4: 0 -> 0, t -> 4t-3 .. 4t)."""
    if temporal_ratio <= 1:
        return range(latent_frame, latent_frame + 1)
    if latent_frame == 0:
        return range(0, 1)
    return range(temporal_ratio * (latent_frame - 1) + 1, temporal_ratio * latent_frame + 1)


def latent_frame_weights(schedule: PromptSchedule, latent_frames: int, temporal_ratio: int) -> list[list[float]]:
    """Per latent frame, the mean weights of the video frames it covers."""
    video_frames = (latent_frames - 1) * temporal_ratio + 1 if temporal_ratio > 1 else latent_frames
    per_frame = frame_weights(schedule, video_frames)
    rows = []
    for t in range(latent_frames):
        frames = covered_frames(t, temporal_ratio)
        rows.append([sum(per_frame[f][j] for f in frames) / len(frames) for j in range(len(schedule.keyframes))])
    return rows
