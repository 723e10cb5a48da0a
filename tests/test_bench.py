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
