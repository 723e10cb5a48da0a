"""The rank side of tests/test_distributed_attention.py: every rank of a gloo group (spawned by
torch.multiprocessing, kernels under Triton's interpreter) runs the cases on its shards of one seeded global problem
and saves its outputs and gradients; the test assembles and judges them in the parent process."""

import os

import torch
import torch.distributed as dist

# (name, function, kv mode, B, H, N_q, N_k, d, dtype, layout): uneven lengths (97 over 2 or 4 ranks), head dims
# 40 / 72 / 128, cross-attention with 77 replicated keys, the (B, N, H, d) layout read in place, an empty shard
CASES = [
    ("ring-self-d40-fp16", "ring", "sharded", 1, 2, 97, 97, 40, "float16", "BHND"),
    ("ring-self-d72-fp32", "ring", "sharded", 1, 2, 61, 61, 72, "float32", "BNHD"),
    ("ring-cross77-d128-fp16", "ring", "replicated", 1, 2, 50, 77, 128, "float16", "BHND"),
    ("ulysses-self-d72-fp16", "ulysses", "sharded", 1, 4, 97, 97, 72, "float16", "BNHD"),
    ("ulysses-self-d40-fp32", "ulysses", "sharded", 2, 4, 45, 45, 40, "float32", "BHND"),
    ("ulysses-cross77-d128-fp16", "ulysses", "replicated", 1, 4, 50, 77, 128, "float16", "BHND"),
    ("ring-3-tokens-fp32", "ring", "sharded", 1, 4, 3, 3, 16, "float32", "BHND"),        # 4 ranks: one shard empty
    ("ulysses-3-tokens-fp16", "ulysses", "sharded", 1, 4, 3, 3, 16, "float16", "BHND"),
]
DTYPES = {"float16": torch.float16, "float32": torch.float32}


def global_inputs(B, H, NQ, NK, d, dtype, layout, seed=0):
    """q, k, v, d_out of the whole sequence, identical on every rank and in the parent."""
    g = torch.Generator().manual_seed(seed)

    def mk(n):
        t = torch.randn((B, n, H, d), generator=g, dtype=torch.float64).to(DTYPES[dtype])
        return t.transpose(1, 2) if layout == "BNHD" else t.transpose(1, 2).contiguous()
    return mk(NQ), mk(NK), mk(NK), mk(NQ)


def shard(t, rank, P):
    return torch.tensor_split(t, P, dim=2)[rank]


def _case(fn, kv, B, H, NQ, NK, d, dtype, layout, rank, P, group):
    from kernels import distributed as KD

    q, k, v, do = global_inputs(B, H, NQ, NK, d, dtype, layout)
    qs = shard(q, rank, P).detach().requires_grad_()
    if kv == "sharded":
        ks, vs = (shard(t, rank, P).detach().requires_grad_() for t in (k, v))
    else:
        ks, vs = (t.detach().clone().requires_grad_() for t in (k, v))
    f = KD.ring_attention if fn == "ring" else KD.ulysses_attention
    out, lse = f(qs, ks, vs, group=group, kv=kv, return_lse=True,
                 input_precision="ieee" if dtype == "float32" else None)
    out.backward(shard(do, rank, P))
    return {"out": out.detach(), "lse": lse, "dq": qs.grad, "dk": ks.grad, "dv": vs.grad}


def _error(call):
    try:
        call()
    except ValueError as exc:
        return f"ValueError: {exc}"
    return "no error"


def run(rank: int, P: int, init_file: str, out_dir: str):
    from kernels import distributed as KD

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=P)
    results = {}
    for name, fn, kv, B, H, NQ, NK, d, dtype, layout in CASES:
        results[name] = _case(fn, kv, B, H, NQ, NK, d, dtype, layout, rank, P, None)
    # a group of one rank (each rank its own): plain attention of the local shard
    singles = [dist.new_group([r]) for r in range(P)]
    q, k, v, _ = global_inputs(1, 2, 20, 20, 40, "float16", "BHND")
    results["group-of-one"] = KD.ring_attention(q, k, v, group=singles[rank]).detach()
    results["group-of-one-ulysses"] = KD.ulysses_attention(q, k, v, group=singles[rank]).detach()
    # bad input, judged on every rank before any attention: a shard with another head dim on the last rank, heads
    # not divisible by the ranks (Ulysses), replicated keys that differ in length
    x = torch.zeros((1, 2, 8, 40 if rank < P - 1 else 32), dtype=torch.float16)
    results["bad-head-dim"] = _error(lambda: KD.ring_attention(x, x, x))
    y = torch.zeros((1, P + 1, 8, 16), dtype=torch.float16)
    results["bad-heads"] = _error(lambda: KD.ulysses_attention(y, y, y))
    z = torch.zeros((1, 2, 8, 16), dtype=torch.float16)
    kz = torch.zeros((1, 2, 77 if rank == 0 else 76, 16), dtype=torch.float16)
    results["bad-replicated"] = _error(lambda: KD.ring_attention(z, kz, kz, kv="replicated"))
    results["bad-dtype"] = _error(lambda: KD.ring_attention(z, z.float() if rank == 1 else z, z))
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()
