"""Schedules, samplers, guidance wrappers, context windows and seeded noise. Nothing here imports ComfyUI."""
