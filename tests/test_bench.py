"""`metalearn bench` runs as a user would run it and reports what it promises (timings are never asserted)."""

import json



def test_bench_reports_agreeing_meta_gradients_and_memory(run_cli, tmp_path):
    proc = run_cli("bench", "sinusoid", "--repeats", "2", "--warmup", "1", "--memory", "--task-chunk", "auto,4",
                   "--memory-workload", "sinusoid", "--memory-steps", "1,2", "--json", "bench.json", check=True)
    assert "speedup" in proc.stdout and "machine:" in proc.stdout and "batched/4" in proc.stdout
    report = json.loads((tmp_path / "bench.json").read_text())
    rows = report["results"]
    assert [(r["workload"], r["resolved"], r["task_chunk"]) for r in rows] == [("sinusoid", "batched", 25), ("sinusoid", "batched", 4)]
    assert rows[0]["reference_ms"] == rows[1]["reference_ms"]  # one reference, timed interleaved with both
    for row in rows:
        assert row["grad_rel_error"] < 1e-4
        assert row["reference_ms"] > 0 and row["ours_ms"] > 0
        for impl in ("reference_peak_mib", "ours_peak_mib"):
            assert set(row[impl]) == {"rss", "heap"} and row[impl]["heap"] >= 0
    assert [r["inner_steps"] for r in report["memory_sweep"]] == [1, 2]


def test_bench_rejects_an_unknown_workload(run_cli):
    proc = run_cli("bench", "imagenet")
    assert proc.returncode == 2 and "imagenet" in proc.stderr and "sinusoid" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bench_rejects_a_bad_task_chunk(run_cli):
    proc = run_cli("bench", "sinusoid", "--task-chunk", "8,0")
    assert proc.returncode == 2 and "--task-chunk" in proc.stderr and "'8,0'" in proc.stderr
    assert "Traceback" not in proc.stderr
