"""Sequence-parallel attention on torch.distributed: ring attention and Ulysses, exact against single-device attention.

Each rank holds a shard of the sequence: q (B, H, N_q^r, d) and k, v (B, H, N_k^r, d) in the kernels' (B, H, N, d)
layout (any strides; shard lengths may differ between ranks). Cross-attention keys (text tokens, N_k = 77) are
usually replicated: ``kv="replicated"`` gives every rank the same full k, v.

* **Ring** (Liu et al. 2023; the ring of xDiT / torch's context parallel): the k / v shards travel around the ring
  with ``batch_isend_irecv`` while the local block is computed (the next block's transfer is posted before the
  current block's kernel runs). Each block's partial (out, lse) comes from ``attention_forward`` unrounded in fp32
  and is merged exactly: lse = logaddexp(lse_a, lse_b), out = out_a e^(lse_a - lse) + out_b e^(lse_b - lse). The
  backward uses the merged out and lse, so each block's ``attention_backward`` is that block's exact share of the
  gradients; dq sums locally, dk / dv accumulate (fp32) while travelling with their k / v block and return to its
  owner after a full turn.
* **Ulysses** (Jacobs et al. 2023): an all-to-all turns sequence shards into head shards (H / P heads, the whole
  sequence), ``kernels.attention`` runs locally, and the inverse all-to-all returns sequence shards. H must be
  divisible by the number of ranks. Its backward is the same two all-to-alls reversed around the kernel's backward.

Both run on any backend (NCCL on GPUs, gloo on CPU with the Triton interpreter). A group of one rank is plain
attention. Metadata (batch, heads, head dim, dtype, shard lengths) is all-gathered first: a rank whose shard does
not match the others raises ValueError on every rank, before any attention runs. A ring x Ulysses hybrid is not
built (the two compose as a Ulysses all-to-all inside each ring group; left for when a multi-node GPU run needs it).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .flash_attention import attention, attention_backward, attention_forward

__all__ = ["ring_attention", "ulysses_attention", "merge_partial", "shard_lengths", "sent_bytes", "KV_MODES"]

KV_MODES = ("sharded", "replicated")
_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}
_SENT = {"ring": 0, "all_to_all": 0}


def sent_bytes(reset: bool = False) -> dict:
    """Bytes this process has sent to other ranks by kind ("ring": point-to-point hops, "all_to_all": the part of
    each all-to-all that leaves the rank); ``reset=True`` zeroes the counters after reading. The benchmark reports
    these counted volumes, not formulas."""
    got = dict(_SENT)
    if reset:
        for key in _SENT:
            _SENT[key] = 0
    return got


def shard_lengths(n: int, parts: int) -> list:
    """The contiguous split of n tokens over ``parts`` ranks that torch.tensor_split makes (the first n % parts
    shards one longer)."""
    if parts < 1 or n < 0:
        raise ValueError(f"need parts >= 1 and n >= 0, got {parts}, {n}")
    return [n // parts + (1 if r < n % parts else 0) for r in range(parts)]


def merge_partial(out, lse, out_b, lse_b):
    """Merge a partial attention (out_b, lse_b) over a disjoint key block into (out, lse), in place, fp32:
    lse' = logaddexp(lse, lse_b), out' = out e^(lse - lse') + out_b e^(lse_b - lse'). Rows whose both lse are -inf
    (no keys yet) stay as they are."""
    new = torch.logaddexp(lse, lse_b)
    safe = torch.where(torch.isinf(new), torch.zeros_like(new), new)
    wa = torch.exp(lse - safe).unsqueeze(-1)
    wb = torch.exp(lse_b - safe).unsqueeze(-1)
    out.mul_(wa).add_(out_b * wb)
    lse.copy_(new)
    return out, lse


def _group_info(group):
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("torch.distributed is not initialized: call torch.distributed.init_process_group first")
    return dist.get_world_size(group), dist.get_rank(group)


def _to_global(group, r):
    return r if group is None else dist.get_global_rank(group, r)


def _metadata(q, k, v, group, kv: str):
    """All ranks' (B, H, d, dtype, N_q, N_k); every rank raises the same ValueError when they disagree."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D torch tensor (B, H, N, d) shard, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if kv not in KV_MODES:
        raise ValueError(f"kv must be one of {KV_MODES}, got {kv!r}")
    P, _ = _group_info(group)
    code = _DTYPE_CODES.get(q.dtype, -1)
    same = int(v.shape == k.shape and k.dtype == q.dtype and v.dtype == q.dtype)
    mine = torch.tensor([q.shape[0], q.shape[1], q.shape[3], code, q.shape[2], k.shape[2],
                         k.shape[0], k.shape[1], k.shape[3], same], dtype=torch.int64)
    allm = [torch.empty_like(mine) for _ in range(P)]
    dist.all_gather(allm, mine, group=group)
    rows = [m.tolist() for m in allm]
    B, H, D, c = rows[0][:4]
    for r, m in enumerate(rows):
        if m[:4] != [B, H, D, c] or m[6:9] != [B, H, D] or m[9] != 1 or m[3] < 0:
            raise ValueError(f"rank {r}'s shard does not match rank 0's: (B, H, d, dtype code, N_q, N_k, k's B, H, d, "
                             f"k, v shapes and dtypes agree) = {m} against {rows[0]} (codes {_DTYPE_CODES}); every rank must hold "
                             "q, k, v with one batch, head count, head dim and dtype")
        if kv == "replicated" and m[5] != rows[0][5]:
            raise ValueError(f"kv='replicated' needs the same k, v on every rank; rank {r} holds {m[5]} keys, rank 0 "
                             f"{rows[0][5]}")
    return P, [m[4] for m in rows], [m[5] for m in rows]


def _rotate(group, P, rank, tensors, recv_shapes, tag: int):
    """Post sends of ``tensors`` to rank + 1 and receives of new tensors of ``recv_shapes`` from rank - 1. Each
    message gets its own tag (tag + i): with several transfers in flight between one pair of ranks (the k / v prefetch
    and the gradient accumulators in the backward), gloo may otherwise match a receive with the wrong message."""
    nxt, prv = _to_global(group, (rank + 1) % P), _to_global(group, (rank - 1) % P)
    bufs = [torch.empty(s, dtype=t.dtype, device=t.device) for t, s in zip(tensors, recv_shapes)]
    ops = [dist.P2POp(dist.isend, t.contiguous(), nxt, group, tag + i) for i, t in enumerate(tensors)]
    _SENT["ring"] += sum(t.numel() * t.element_size() for t in tensors)
    ops += [dist.P2POp(dist.irecv, b, prv, group, tag + i) for i, b in enumerate(bufs)]
    return dist.batch_isend_irecv(ops), bufs


class _Ring(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, scale, input_precision, kv_lengths):
        P, rank = _group_info(group)
        B, H, NQ, D = q.shape
        out = torch.zeros((B, H, NQ, D), dtype=torch.float32, device=q.device)
        lse = torch.full((B, H, NQ), float("-inf"), dtype=torch.float32, device=q.device)
        part = torch.empty_like(out)
        part_lse = torch.empty_like(lse)
        cur_k, cur_v = k, v
        for s in range(P):
            src = (rank - s) % P
            reqs = bufs = None
            if s < P - 1:                      # prefetch the next block while this one is computed
                shape = (B, H, kv_lengths[(rank - s - 1) % P], D)
                reqs, bufs = _rotate(group, P, rank, (cur_k, cur_v), (shape, shape), 4 * s)
            if kv_lengths[src] > 0 and NQ > 0:
                attention_forward(q, cur_k, cur_v, scale, input_precision, out=part, lse=part_lse)
                merge_partial(out, lse, part, part_lse)
            if reqs is not None:
                for r in reqs:
                    r.wait()
                cur_k, cur_v = bufs
        out_q = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out_q, lse)
        ctx.group, ctx.scale, ctx.input_precision, ctx.kv_lengths = group, scale, input_precision, kv_lengths
        ctx.mark_non_differentiable(lse)
        return out_q, lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k, v, out, lse = ctx.saved_tensors
        group = ctx.group
        P, rank = _group_info(group)
        B, H, NQ, D = q.shape
        lens = ctx.kv_lengths
        d_out = d_out.contiguous()
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        cur_k, cur_v = k, v
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv = torch.zeros_like(dk)
        for s in range(P):
            src = (rank - s) % P
            reqs = bufs = None
            if s < P - 1:                      # prefetch the next k, v; the accumulators follow after this block
                shape = (B, H, lens[(rank - s - 1) % P], D)
                reqs, bufs = _rotate(group, P, rank, (cur_k, cur_v), (shape, shape), 4 * s)
            if lens[src] > 0 and NQ > 0:
                gq, gk, gv = attention_backward(q, cur_k, cur_v, out, lse, d_out, ctx.scale, ctx.input_precision,
                                                grad_dtype=torch.float32)
                dq.add_(gq)
                dk.add_(gk)
                dv.add_(gv)
            if P > 1:                          # the accumulators travel with their block (after the last block:
                nxt_len = lens[(rank - s - 1) % P]   # home to its owner)
                shape = (B, H, nxt_len, D)
                acc_reqs, acc = _rotate(group, P, rank, (dk, dv), (shape, shape), 4 * s + 2)
                for r in acc_reqs:
                    r.wait()
                dk, dv = acc
            if reqs is not None:
                for r in reqs:
                    r.wait()
                cur_k, cur_v = bufs
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def _replicated(q, k, v, scale, input_precision):
    return attention(q, k, v, scale=scale, return_lse=True, input_precision=input_precision)


def ring_attention(q, k, v, group=None, scale=None, input_precision: str | None = None, kv: str = "sharded",
                   return_lse: bool = False):
    """Ring attention over ``group`` (default: the world): softmax(scale q k^T) v of the full sequence for this rank's
    query shard. Differentiable (dq, dk, dv of this rank's shards). ``kv="replicated"``: k, v are the same full
    tensors on every rank (cross-attention), no ring needed; their gradients are then this rank's share (an
    all_reduce SUM over the group gives the gradient of the shared k, v, as for any replicated tensor). Returns out
    (and its float32 lse (B, H, N_q^r))."""
    P, lq, lk = _metadata(q, k, v, group, kv)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if kv == "replicated" or P == 1:
        o, lse = _replicated(q, k, v, scale, input_precision)
    else:
        o, lse = _Ring.apply(q, k, v, group, scale, input_precision, lk)
    return (o, lse) if return_lse else o


class _AllToAll(torch.autograd.Function):
    """(B, H, N_r, d) sequence shards <-> (B, H / P, N, d) head shards; the backward is the inverse exchange."""

    @staticmethod
    def forward(ctx, x, group, lengths, to_heads: bool):
        ctx.group, ctx.lengths, ctx.to_heads = group, lengths, to_heads
        return _exchange(x, group, lengths, to_heads)

    @staticmethod
    def backward(ctx, g):
        return _exchange(g.contiguous(), ctx.group, ctx.lengths, not ctx.to_heads), None, None, None


def _exchange(x, group, lengths, to_heads: bool):
    """One all_to_all_single over flat buffers (gloo's list all_to_all needs equal shapes; uneven shards do not)."""
    P, rank = _group_info(group)
    B, D = x.shape[0], x.shape[3]
    if to_heads:                                   # head group j of my sequence shard -> rank j
        hp = x.shape[1] // P
        sends = [x[:, j * hp:(j + 1) * hp] for j in range(P)]
        shapes = [(B, hp, lengths[j], D) for j in range(P)]
        cat_dim = 2
    else:                                          # rank j's sequence shard of my head group -> rank j
        sends = list(torch.split(x, lengths, dim=2))
        shapes = [(B, x.shape[1], lengths[rank], D)] * P
        cat_dim = 1
    flat = torch.cat([t.reshape(-1) for t in sends])
    out = torch.empty(sum(math.prod(sh) for sh in shapes), dtype=x.dtype, device=x.device)
    dist.all_to_all_single(out, flat, [math.prod(sh) for sh in shapes], [t.numel() for t in sends], group=group)
    _SENT["all_to_all"] += (flat.numel() - sends[rank].numel()) * flat.element_size()
    parts = torch.split(out, [math.prod(sh) for sh in shapes])
    return torch.cat([p.view(sh) for p, sh in zip(parts, shapes)], dim=cat_dim)


def ulysses_attention(q, k, v, group=None, scale=None, input_precision: str | None = None, kv: str = "sharded",
                      return_lse: bool = False):
    """Ulysses attention over ``group``: all-to-all to head shards, full-sequence attention on H / P heads, all-to-all
    back. Differentiable. H must be divisible by the group size. ``kv="replicated"``: k, v are full on every rank
    (cross-attention); only q and the output are exchanged, k / v are sliced to the local heads (their gradients:
    this rank's share, all_reduce SUM for the shared tensors)."""
    P, lq, lk = _metadata(q, k, v, group, kv)
    H = q.shape[1]
    if H % P:
        raise ValueError(f"Ulysses splits the {H} heads over {P} ranks: the head count must be divisible by the "
                         f"number of ranks (use ring_attention, or a group whose size divides {H})")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if P == 1:
        o, lse = _replicated(q, k, v, scale, input_precision)
        return (o, lse) if return_lse else o
    _, rank = _group_info(group)
    qh = _AllToAll.apply(q, group, lq, True)
    if kv == "sharded":
        kh, vh = _AllToAll.apply(k, group, lk, True), _AllToAll.apply(v, group, lk, True)
    else:
        hp = H // P
        kh, vh = k[:, rank * hp:(rank + 1) * hp], v[:, rank * hp:(rank + 1) * hp]
    oh, lse_h = attention(qh, kh, vh, scale=scale, return_lse=True, input_precision=input_precision)
    o = _AllToAll.apply(oh, group, lq, False)
    with torch.no_grad():
        lse = _exchange(lse_h.unsqueeze(-1).contiguous(), group, lq, False).squeeze(-1)
    return (o, lse) if return_lse else o
