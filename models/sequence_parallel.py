"""Sequence parallelism (Ulysses, ring, both) and CFG parallelism for the HunyuanVideo DiT, on torch.distributed.

Only torch.distributed collectives are used (all-to-all, all-gather, isend/irecv), so the same code runs on NCCL
(GPUs) and gloo (CPUs, how the tests run it). Every rank holds the whole model and returns the whole output.

Rank layout (as xDiT orders its degrees; Ulysses innermost, so its all-to-alls stay on the fastest links):

    rank = cfg_index * (ulysses * ring) + ring_index * ulysses + ulysses_index

- CFG parallel (`cfg=2`): a batch of cond + uncond (even batch) is split in halves, half `cfg_index` per rank
  group, and the outputs are all-gathered along the batch. An odd batch (no CFG batching) is computed by both groups.
- Sequence parallel (`ulysses * ring > 1`): the video tokens, padded at the end to a multiple of the degree, are
  split into contiguous slices, slice `ring_index * ulysses + ulysses_index` per rank; each rank's RoPE factors
  are those of its slice. Text tokens are replicated (and their refiner runs on every rank).
  Inside each joint attention:
  * Ulysses: one all-to-all turns the sequence split into a head split (each rank: the `ulysses` slices of its
    ring block, heads/ulysses heads), one all-to-all turns it back afterwards. Text queries/keys/values are
    replicated, so each rank takes its heads of them; the text outputs are all-gathered over heads.
  * Ring: each rank attends its queries to the text keys and to every ring block's video keys, the key/value
    blocks passing around the ring (isend to the next rank, irecv from the previous one, overlapped with the
    block's attention); the partial results are merged exactly by their log-sum-exp (online softmax).
  Ulysses alone runs each attention through the model's attention backend (models/attention.py `attend`); with
  ring > 1 every block runs through `attention.attend_partial`, a math kernel that also returns the log-sum-exp.
  The final layer runs on each rank's slice; its output (patch * channels wide, smaller than hidden) is
  all-gathered and the padding dropped.

Heads that do not divide by `ulysses` are padded with zero heads (exact: a zero head attends uniformly to zero
values, and its output is dropped), which costs (padded - heads) / padded of the attention compute.
`ParallelPlan.for_heads` avoids that: it gives Ulysses the largest degree dividing both the heads and the sequence
degree and the rest of the sequence degree to ring (a mixed degree, as xDiT's USP).

With a step cache, the probe is all-gathered (tokens, then CFG halves) so every rank takes the same decision from
the same probe the single-process model would compute; each rank stores and reuses its own residual slice.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..errors import KineFlowError
from .attention import KeyPadding, attend, attend_partial


@dataclass(frozen=True)
class ParallelPlan:
    """Degrees of parallelism; their product is the number of processes (ranks). Heads that do not divide by
    `ulysses` are padded with zero heads (exact, some attention compute wasted); `for_heads` picks a mixed
    Ulysses x ring plan that needs no padding."""

    ulysses: int = 1
    ring: int = 1
    cfg: int = 1

    def __post_init__(self):
        for name in ("ulysses", "ring", "cfg"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise KineFlowError(f"parallel degree {name} must be an integer >= 1; got {value!r}")
        if self.cfg not in (1, 2):
            raise KineFlowError(
                f"cfg parallel degree must be 1 or 2 (the conditional and unconditional passes); got {self.cfg}")

    @property
    def world_size(self) -> int:
        return self.ulysses * self.ring * self.cfg

    @property
    def sequence_degree(self) -> int:
        return self.ulysses * self.ring

    @classmethod
    def for_heads(cls, world_size: int, heads: int, cfg: int = 1) -> "ParallelPlan":
        """The plan for `world_size` ranks that needs no head padding: `cfg` ways for CFG, the rest of the ranks
        split into the largest Ulysses degree dividing both `heads` and that rest, and ring for what remains."""
        if world_size < 1 or world_size % cfg:
            raise KineFlowError(f"world size {world_size} must be a positive multiple of the cfg degree {cfg}")
        sequence = world_size // cfg
        ulysses = max(d for d in range(1, sequence + 1) if sequence % d == 0 and heads % d == 0)
        return cls(ulysses=ulysses, ring=sequence // ulysses, cfg=cfg)


class ParallelGroups:
    """This rank's place in a `ParallelPlan` and the process groups it talks over (None for a degree of 1).

    `comm_bytes` counts, per kind ("all_to_all", "ring", "gather_text", "gather_tokens", "cfg", "probe"), the bytes
    this rank sent (an all-to-all sends all but its own chunk; an all-gather its piece to each other member)."""

    def __init__(self, plan: ParallelPlan):
        if not dist.is_available() or not dist.is_initialized():
            raise KineFlowError("parallel_groups needs torch.distributed initialised (init_process_group) first")
        world = dist.get_world_size()
        if world != plan.world_size:
            raise KineFlowError(
                f"the parallel plan (ulysses={plan.ulysses} x ring={plan.ring} x cfg={plan.cfg}) needs "
                f"{plan.world_size} processes; torch.distributed has {world}")
        self.plan = plan
        self.rank = dist.get_rank()
        u, r, seq = plan.ulysses, plan.ring, plan.sequence_degree
        self.cfg_index, self.sequence_rank = divmod(self.rank, seq)
        self.ring_index, self.ulysses_index = divmod(self.sequence_rank, u)
        cfgs, rings, ulyss, seqs = range(plan.cfg), range(r), range(u), range(seq)
        # Every rank creates every group, in this order (torch.distributed requires it).
        self.sequence_group = self._group([[c * seq + p for p in seqs] for c in cfgs])
        self.ulysses_group = self._group([[c * seq + i * u + j for j in ulyss] for c in cfgs for i in rings])
        self.ring_group = self._group([[c * seq + i * u + j for i in rings] for c in cfgs for j in ulyss])
        self.cfg_group = self._group([[c * seq + p for c in cfgs] for p in seqs])
        base = self.cfg_index * seq + self.ulysses_index
        self.ring_next = base + ((self.ring_index + 1) % r) * u
        self.ring_prev = base + ((self.ring_index - 1) % r) * u
        self.comm_bytes: Counter = Counter()

    def __deepcopy__(self, memo):
        """A model copy (LoRA merge) shares this rank's communicators: process groups cannot be copied."""
        return self

    def _group(self, rank_lists: list[list[int]]):
        if len(rank_lists[0]) == 1:
            return None
        mine = None
        for ranks in rank_lists:
            group = dist.new_group(ranks)
            if self.rank in ranks:
                mine = group
        return mine

    # ------------------------------------------------------------------ collectives (counted)
    def all_gather(self, t: torch.Tensor, group, dim: int, kind: str) -> torch.Tensor:
        size = dist.get_world_size(group)
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(size)]
        dist.all_gather(parts, t, group=group)
        self.comm_bytes[kind] += t.numel() * t.element_size() * (size - 1)
        return torch.cat(parts, dim=dim)

    def all_to_all(self, t: torch.Tensor) -> torch.Tensor:
        """Chunk i of dim 0 goes to Ulysses rank i; chunk i of the result came from Ulysses rank i."""
        t = t.contiguous()
        out = torch.empty_like(t)
        dist.all_to_all_single(out, t, group=self.ulysses_group)
        self.comm_bytes["all_to_all"] += t.numel() * t.element_size() * (t.shape[0] - 1) // t.shape[0]
        return out

    def ring_pass(self, t: torch.Tensor):
        """Start sending `t` to the next ring rank and receiving the previous one's; (buffer, requests)."""
        buffer = torch.empty_like(t)
        requests = [dist.isend(t, self.ring_next, group=self.ring_group),
                    dist.irecv(buffer, self.ring_prev, group=self.ring_group)]
        self.comm_bytes["ring"] += t.numel() * t.element_size()
        return buffer, requests

    # ------------------------------------------------------------------ the model's entry points
    def splits_batch(self, batch: int) -> bool:
        return self.plan.cfg == 2 and batch % 2 == 0

    def run(self, forward, x, timestep, text_states, text_mask, text_states_2, guidance, step_cache, **options):
        """The model's forward under CFG parallel: this group's half of an even batch, then the halves gathered.
        `options`: keyword arguments of the forward that are not per batch item (passed as they are)."""
        b = x.shape[0]
        if not self.splits_batch(b):
            return forward(x, timestep, text_states, text_mask, text_states_2, guidance, step_cache, **options)
        half = slice(self.cfg_index * b // 2, (self.cfg_index + 1) * b // 2)
        timestep = torch.as_tensor(timestep, device=x.device).expand(b)[half]
        if guidance is not None:
            guidance = torch.as_tensor(guidance, device=x.device).expand(b)[half]
        text_mask = None if text_mask is None else text_mask[half]
        out = forward(x[half], timestep, text_states[half], text_mask, text_states_2[half], guidance, step_cache,
                      batch_split=True, **options)
        return self.all_gather(out, self.cfg_group, 0, "cfg")

    def shard_tokens(self, img: torch.Tensor, freqs: torch.Tensor):
        """This rank's slice of the video tokens [B, N, C] and of their RoPE factors [N, 1, D/2], padded at the end
        of the sequence to a multiple of the sequence degree (padded tokens get zero inputs, identity rotation)."""
        n = img.shape[1]
        local = -(-n // self.plan.sequence_degree)
        pad = local * self.plan.sequence_degree - n
        if pad:
            img = F.pad(img, (0, 0, 0, pad))
            freqs = torch.cat((freqs, torch.ones_like(freqs[:1]).expand(pad, *freqs.shape[1:])))
        start = self.sequence_rank * local
        return img[:, start:start + local], freqs[start:start + local]

    def token_offset(self, local: int) -> int:
        """Where this rank's slice of `local` video tokens (from shard_tokens) starts in the whole sequence."""
        return self.sequence_rank * local

    def gather_tokens(self, local: torch.Tensor, n_tokens: int) -> torch.Tensor:
        """All ranks' token slices [B, N/P, C] -> [B, N, C] (padding dropped)."""
        return self.all_gather(local, self.sequence_group, 1, "gather_tokens")[:, :n_tokens]

    def gather_probe(self, probe: torch.Tensor, n_tokens: int, batch_split: bool) -> torch.Tensor:
        """The step cache's probe as the single-process model computes it (all tokens, the whole batch)."""
        if self.plan.sequence_degree > 1:
            probe = self.all_gather(probe, self.sequence_group, 1, "probe")[:, :n_tokens]
        if batch_split:
            probe = self.all_gather(probe, self.cfg_group, 0, "probe")
        return probe


def parallel_groups(plan: ParallelPlan) -> ParallelGroups:
    """Build this rank's groups for `plan`; call it on every rank after `torch.distributed.init_process_group`."""
    return ParallelGroups(plan)


@dataclass(frozen=True)
class ShardedAttention:
    """Passed to the DiT's blocks in place of the joint attention mask when the video tokens are split.

    Queries, keys and values come in as this rank's [video slice (n_local); all text] [B, n_local + L, H, D];
    the result is what single-process attention gives for those queries, [B, n_local + L, H * D]."""

    groups: ParallelGroups
    n_tokens: int  # real video tokens over all ranks
    n_local: int  # video tokens per rank (padded)
    text_valid: torch.Tensor | None  # [B, L] on the compute device, True = real; None when all are real
    text_lengths: tuple[int, ...] | None  # real text tokens per item when the text is right-padded

    def _video_valid(self, ring_index: int, device) -> torch.Tensor | None:
        """Which keys of ring block `ring_index` are real video tokens, [block]; None if all are."""
        block = self.n_local * self.groups.plan.ulysses
        start = ring_index * block
        if start + block <= self.n_tokens:
            return None
        return torch.arange(start, start + block, device=device) < self.n_tokens

    def __call__(self, q, k, v, backend: str) -> torch.Tensor:
        plan, g = self.groups.plan, self.groups
        b, _, heads, d = q.shape
        u, n = plan.ulysses, self.n_local
        padded_heads = -(-heads // u) * u
        per_rank = padded_heads // u
        if padded_heads != heads:
            q, k, v = (F.pad(t, (0, 0, 0, padded_heads - heads)) for t in (q, k, v))
        qkv_img = torch.stack((q[:, :n], k[:, :n], v[:, :n]))  # [3, B, n, Hp, D]
        mine = slice(g.ulysses_index * per_rank, (g.ulysses_index + 1) * per_rank)
        qt, kt, vt = q[:, n:, mine], k[:, n:, mine], v[:, n:, mine]
        if u > 1:  # sequence split -> head split: [U(heads), 3, B, n, Hp/U, D] -> [U(sequence), ...]
            qkv_img = g.all_to_all(qkv_img.unflatten(3, (u, per_rank)).permute(3, 0, 1, 2, 4, 5))
            qkv_img = qkv_img.permute(1, 2, 0, 3, 4, 5).reshape(3, b, u * n, per_rank, d)
        qi, ki, vi = qkv_img.unbind(0)
        queries = torch.cat((qi, qt), dim=1).transpose(1, 2)
        if plan.ring == 1:
            out = self._local(queries, ki, vi, kt, vt, backend)
        else:
            out = self._ring(queries, ki, vi, kt, vt)
        out = out.transpose(1, 2)  # [B, U*n + L, Hp/U, D]
        oi, ot = out[:, :u * n], out[:, u * n:]
        if u > 1:  # head split -> sequence split, and every head of the text outputs
            oi = g.all_to_all(oi.unflatten(1, (u, n)).transpose(0, 1))  # [U(heads), B, n, Hp/U, D]
            oi = oi.permute(1, 2, 0, 3, 4).reshape(b, n, padded_heads, d)
            ot = g.all_gather(ot, g.ulysses_group, 2, "gather_text")
        return torch.cat((oi[:, :, :heads], ot[:, :, :heads]), dim=1).flatten(2)

    def _local(self, queries, ki, vi, kt, vt, backend):
        """Ulysses only: one attention over this rank's heads of the whole sequence, through the backend."""
        keys, values = torch.cat((ki, kt), 1).transpose(1, 2), torch.cat((vi, vt), 1).transpose(1, 2)
        video_valid = self._video_valid(0, queries.device)
        mask = None
        if video_valid is not None or self.text_valid is not None:
            b, n_video, n_text = queries.shape[0], ki.shape[1], kt.shape[1]
            video = (torch.ones(n_video, dtype=torch.bool, device=queries.device) if video_valid is None
                     else video_valid).expand(b, n_video)
            text = (torch.ones(b, n_text, dtype=torch.bool, device=queries.device) if self.text_valid is None
                    else self.text_valid)
            mask = torch.cat((video, text), dim=1)[:, None, None, :]
            if video_valid is None and self.text_lengths is not None:
                mask = KeyPadding(mask, tuple(n_video + length for length in self.text_lengths))
        return attend(queries, keys, values, mask, backend)

    def _ring(self, queries, ki, vi, kt, vt):
        """Ring attention: the text block first (it always holds a real key), then each ring block's video keys
        as they arrive from the previous rank, merged by log-sum-exp."""
        g, ring = self.groups, self.groups.plan.ring
        text_mask = None if self.text_valid is None else self.text_valid[:, None, None, :]
        out, lse = attend_partial(queries, kt.transpose(1, 2), vt.transpose(1, 2), text_mask)
        kv = torch.stack((ki, vi)).contiguous()
        for step in range(ring):
            if step < ring - 1:
                incoming, requests = g.ring_pass(kv)
            source = (g.ring_index - step) % ring
            valid = self._video_valid(source, queries.device)
            block_out, block_lse = attend_partial(queries, kv[0].transpose(1, 2), kv[1].transpose(1, 2),
                                                  None if valid is None else valid[None, None, None, :])
            out, lse = merge_partial(out, lse, block_out, block_lse)
            if step < ring - 1:
                for request in requests:
                    request.wait()
                kv = incoming
        return out.to(queries.dtype)


def merge_partial(out_a, lse_a, out_b, lse_b):
    """Softmax attention over the union of two key sets from the parts over each (outputs [B, H, L, D] and
    log-sum-exps [B, H, L]); `lse_a` must be finite (a part that saw a real key)."""
    lse = torch.logaddexp(lse_a, lse_b)
    out = out_a * torch.exp(lse_a - lse)[..., None] + out_b * torch.exp(lse_b - lse)[..., None]
    return out, lse

