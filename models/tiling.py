"""Tiled VAE settings, checked without torch: validation applies to VAE Decode / Encode's tiles the rule (and message)
the VAE applies when it runs (`hunyuan_video_vae.TilingOptions.check`). Also how a run over several processes shares
tiles out over its ranks (`share_tiles`, torch imported when it runs)."""

from ..errors import RankFailure

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


def share_tiles(tiles: list, run, shape, group, device):
    """(tile, run(tile)) for every tile, in order, each computed by one rank of `group`: in rounds of n tiles (n
    ranks) rank r runs tile r of the round, then each result (float32, on `device`) is broadcast from the rank that
    has it (`shape(tile)` tells the others its shape). Callers blend the results in tile order, as one process
    does, so every rank gets the same bits as one process."""
    import torch
    import torch.distributed as dist

    size, me = dist.get_world_size(group), dist.get_rank(group)
    ranks = dist.get_process_group_ranks(group)
    for first in range(0, len(tiles), size):
        round_ = tiles[first : first + size]
        mine = run(round_[me]).to(device=device, dtype=torch.float32).contiguous() if me < len(round_) else None
        for index, tile in enumerate(round_):
            result = mine if index == me else torch.empty(shape(tile), dtype=torch.float32, device=device)
            try:
                dist.broadcast(result, src=ranks[index], group=group)
            except Exception as error:  # a closed peer or the collective timeout
                detail = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
                raise RankFailure(f"VAE decode: rank {dist.get_rank()} lost the other ranks (a rank died, failed or "
                                  f"did not answer in time); nothing was written. ({detail})") from None
            yield tile, result
