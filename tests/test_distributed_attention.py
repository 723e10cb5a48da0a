"""Sequence-parallel attention (kernels.distributed: ring and Ulysses) on 2- and 4-rank gloo groups spawned on this
machine, against single-process kernels.attention and the float64 reference by the flash-attention rule: forward,
LSE and gradients, uneven shards, cross-attention with replicated keys, head dims 40 / 72 / 128, the (B, N, H, d)
layout in place; groups of one rank; bad input raised on every rank before any attention."""

import tempfile

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

import torch.multiprocessing as mp  # noqa: E402

import dist_worker as W  # noqa: E402
from attention_rule import backward_violations, forward_violations  # noqa: E402
from kernels import distributed as KD  # noqa: E402
from kernels import flash_attention as KA  # noqa: E402


@pytest.fixture(scope="module", params=[2, 4], ids=lambda p: f"{p}-ranks")
def ranks(request):
    P = request.param
    with tempfile.TemporaryDirectory() as out, tempfile.NamedTemporaryFile() as init:
        mp.start_processes(W.run, args=(P, init.name + ".store", out), nprocs=P, join=True, start_method="spawn")
        yield P, [torch.load(f"{out}/rank{r}.pt") for r in range(P)]


def _assemble(results, name, P, kv):
    parts = [r[name] for r in results]
    cat = {key: torch.cat([p[key] for p in parts], dim=2) for key in ("out", "lse", "dq")}
    for key in ("dk", "dv"):
        cat[key] = (torch.cat([p[key] for p in parts], dim=2) if kv == "sharded"
                    else sum(p[key].double() for p in parts).to(parts[0][key].dtype))   # replicated: sum the shares
    return cat


@pytest.mark.parametrize("case", W.CASES, ids=lambda c: c[0])
def test_distributed_attention_follows_the_rule(ranks, case):
    P, results = ranks
    name, fn, kv, B, H, NQ, NK, d, dtype, layout = case
    q, k, v, do = W.global_inputs(B, H, NQ, NK, d, dtype, layout)
    got = _assemble(results, name, P, kv)
    v_out, v_lse = forward_violations(got["out"], got["lse"], q, k, v)
    assert v_out <= 1.0 and v_lse <= 1.0, (v_out, v_lse)
    viol = backward_violations({"q": got["dq"], "k": got["dk"], "v": got["dv"]}, q, k, v, do)
    assert max(viol.values()) <= 1.0, viol
    # and the single-process kernel on the whole sequence holds the same rule: both are the same computation up to
    # the merge order, which the rule bounds
    single = KA.attention(q, k, v, input_precision="ieee" if dtype == "float32" else None)
    assert forward_violations(single, got["lse"], q, k, v)[0] <= 1.0


def test_a_group_of_one_rank_is_plain_attention(ranks):
    P, results = ranks
    q, k, v, _ = W.global_inputs(1, 2, 20, 20, 40, "float16", "BHND")
    want = KA.attention(q, k, v)
    for r in results:
        assert torch.equal(r["group-of-one"], want) and torch.equal(r["group-of-one-ulysses"], want)


@pytest.mark.parametrize("case,fragment", [("bad-head-dim", "does not match rank 0"),
                                           ("bad-heads", "divisible by the number of ranks"),
                                           ("bad-replicated", "same k, v on every rank"),
                                           ("bad-dtype", "does not match rank 0")])
def test_bad_input_is_refused_on_every_rank(ranks, case, fragment):
    P, results = ranks
    for r in results:
        assert r[case].startswith("ValueError") and fragment in r[case], r[case]


def test_merge_partial_and_shard_lengths():
    q, k, v, _ = W.global_inputs(1, 2, 9, 30, 16, "float32", "BHND")
    o1, l1 = KA.attention_forward(q, k[:, :, :11], v[:, :, :11], input_precision="ieee")
    o2, l2 = KA.attention_forward(q, k[:, :, 11:], v[:, :, 11:], input_precision="ieee")
    o, l = KD.merge_partial(o1.clone(), l1.clone(), o2, l2)
    full, lf = KA.attention_forward(q, k, v, input_precision="ieee")
    assert torch.allclose(o, full, rtol=0, atol=1e-6) and torch.allclose(l, lf, rtol=0, atol=1e-6)
    empty_o, empty_l = torch.zeros_like(o1), torch.full_like(l1, float("-inf"))
    KD.merge_partial(empty_o, empty_l, o1, l1)
    assert torch.equal(empty_o, o1) and torch.equal(empty_l, l1)
    assert KD.shard_lengths(97, 4) == [25, 24, 24, 24] == [len(t) for t in torch.arange(97).tensor_split(4)]


def test_without_an_initialized_group_the_error_says_so():
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is initialized in this process")
    x = torch.zeros((1, 2, 4, 16), dtype=torch.float16)
    with pytest.raises(ValueError, match="not initialized"):
        KD.ring_attention(x, x, x)
