"""Tiled VAE settings, checked without torch: validation applies to VAE Decode / Encode's tiles the rule (and message)
the VAE applies when it runs (`hunyuan_video_vae.TilingOptions.check`)."""

SPATIAL_RATIO = 8  # pixels per latent pixel, both VAE families
TEMPORAL_RATIO = 4  # video frames per latent frame of the causal 3D VAE


def tiling_problem(tile_size: int, tile_overlap: int, tile_frames: int, frame_overlap: int,
                   spatial_ratio: int = SPATIAL_RATIO, temporal_ratio: int = TEMPORAL_RATIO) -> str | None:
    """None when the tiles can be used, else why not: sizes and overlaps are multiples of the compression ratios and
    a tile is at least twice its overlap."""
    for name, value, unit in (("tile_size", tile_size, spatial_ratio), ("tile_overlap", tile_overlap, spatial_ratio),
                              ("tile_frames", tile_frames, temporal_ratio),
                              ("frame_overlap", frame_overlap, temporal_ratio)):
        if value < 0 or value % unit:
            return f"{name} must be a non-negative multiple of {unit}; found {value}"
    for size, overlap, what in ((tile_size, tile_overlap, "tile_size"), (tile_frames, frame_overlap, "tile_frames")):
        if size == 0 or 2 * overlap > size:
            return f"{what} must be positive and at least twice its overlap; found {size} with overlap {overlap}"
    return None
