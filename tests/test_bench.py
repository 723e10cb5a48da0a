"""The benchmark script runs end to end (dry run under the interpreter: no timings are claimed from it)."""

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("triton")

from refdiff import cli  # noqa: E402


def test_bench_without_a_gpu_is_not_run(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["bench"]) == cli.EXIT_NOT_RUN


def test_bench_dry_run_writes_json_and_markdown(tmp_path):
    assert cli.main(["bench", "--dry-run", "--out", str(tmp_path)]) == 0
    (doc_path,) = tmp_path.glob("sampler_step-*.json")
    doc = json.loads(doc_path.read_text())
    assert doc["schema"] == "refdiff.bench/1" and "dry-run" in doc["env"]["mode"]
    configs = {r["config"] for r in doc["rows"]}
    assert configs == {"CFG+DDIM", "CFG+DPM++2M", "CFG+EulerAncestral"}
    for r in doc["rows"]:
        assert r["bytes"] > 0 and r["ours_ms"][0] > 0 and "compile_ms" in r
    assert "DRY RUN" in next(tmp_path.glob("sampler_step-*.md")).read_text()
    (att_path,) = tmp_path.glob("attention-*.json")
    att = json.loads(att_path.read_text())
    assert att["rows"] and all(r["max_abs_err_vs_fp32_math"] < 0.05 and r["ours_fwd_ms"][0] > 0 for r in att["rows"])


def test_distributed_bench_dry_run_counts_the_bytes_each_rank_sends(tmp_path):
    """Two gloo ranks, tiny shape: the script runs end to end, ring and Ulysses agree with the single-device kernel,
    and the counted traffic is the volume the algorithms imply (fp16, B H d = 1 x 4 x 32, N = 50 over 2 ranks):
    ring forward: P - 1 hops of one k and one v shard; forward + backward adds the backward's P - 1 k / v hops and
    P hops of the fp32 dk / dv accumulators. Ulysses: each all-to-all keeps 1/P of a rank's tensor at home; the
    forward exchanges q, k, v, out (fp16) and the lse (fp32), the backward d_out and dq, dk, dv (fp16)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench import distributed_attention as DA

    assert DA.main(["--dry-run", "--ranks", "2", "--out", str(tmp_path)]) == 0
    (doc_path,) = tmp_path.glob("distributed_attention-*.json")
    (row,) = json.loads(doc_path.read_text())["rows"]
    B, H, N, d, P = 1, 4, 50, 32, 2
    shard = B * H * (N // P) * d                       # elements of one rank's q (or k, v, out) shard
    ring_fwd = (P - 1) * 2 * shard * 2
    assert row["ring_fwd_sent_bytes_per_rank"] == [ring_fwd] * P
    assert row["ring_fwdbwd_sent_bytes_per_rank"] == [2 * ring_fwd + P * 2 * shard * 4] * P
    away = (P - 1) / P
    uly_fwd = away * (4 * shard * 2 + B * H * (N // P) * 4)
    assert row["ulysses_fwd_sent_bytes_per_rank"] == [uly_fwd] * P
    assert row["ulysses_fwdbwd_sent_bytes_per_rank"] == [uly_fwd + away * 4 * shard * 2] * P
    # the same fp16 computation merged in another order: 2 fp16 ulp of outputs below 2 in magnitude (2 x 2^-10)
    assert row["ring_max_abs_err_vs_single"] < 2e-3 and row["ulysses_max_abs_err_vs_single"] < 2e-3
    assert "DRY RUN" in next(tmp_path.glob("distributed_attention-*.md")).read_text()
