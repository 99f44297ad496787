"""`python -m tools.gpu_check`: the runner keeps going past failures within its budget and leaves nothing
running, and the checks run at toy size on a CPU (`--device cpu --tiny`) so the GPU command cannot rot
unnoticed."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, trainer_env
from tools.gpu_check.checks import (
    bench_figures,
    cudagraph_verdict,
    group_ranks,
    judge_overflow,
    late_means,
    optional_output,
    quality_verdict,
    registry,
    save_npz_within,
    startup_figures,
    training_figures,
)
from tools.gpu_check.cli import select
from tools.gpu_check.runner import Check, CheckFailed, plan_cap

FIXTURES = "tests.gpu_check_fixtures"
REGISTRY = [c.name for c in registry(tiny=True, data_source=None)]


def gpu_check_command(out: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "tools.gpu_check", "--out", str(out), "--work", str(out.parent / "work"), *args]


def gpu_check(
    out: Path, *args: str, timeout: float = 300, env: dict | None = None, cwd: Path = REPO
) -> tuple[subprocess.CompletedProcess, dict, float]:
    start = time.monotonic()
    proc = subprocess.run(
        gpu_check_command(out, *args),
        cwd=cwd,
        env=env or trainer_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    wall = time.monotonic() - start
    assert (out / "report.json").is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads((out / "report.json").read_text()), wall


def by_name(report: dict) -> dict[str, dict]:
    return {c["name"]: c for c in report["checks"]}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat")
    return not (state.exists() and state.read_text().rsplit(")", 1)[1].split()[0] == "Z")  # a zombie is gone


@pytest.mark.slow
def test_failures_caps_and_budget(tmp_path):
    """A raising check fails with its error and the next still runs; a check past its cap is killed with
    its whole process tree and keeps its figures; a hung command is stopped by the check itself; a check
    without a cap gets the rest of the budget and no more; what the budget cannot fit is skipped."""
    names = ["raises:10", "sleeps_past_cap:4", "hangs_in_command:10", "passes:10", "hogs", "never_reached:10"]
    extra = [arg for n in names for arg in ("--extra-check", f"{FIXTURES}:{n}")]
    budget = 20.0
    only = ",".join(n.split(":")[0] for n in names)
    proc, report, wall = gpu_check(
        tmp_path / "out", "--device", "cpu", "--budget-s", str(budget), "--only", only, *extra
    )
    assert proc.returncode == 1  # failures and timeouts
    assert wall < budget + 5, f"{wall:.1f}s for a {budget}s budget"
    checks_ = by_name(report)

    assert checks_["raises"]["status"] == "failed"
    assert checks_["raises"]["error"] == "RuntimeError: boom on purpose"
    assert checks_["raises"]["figures"] == {"before_the_error": 1}

    slept = checks_["sleeps_past_cap"]
    assert slept["status"] == "timeout" and "cap of 4s" in slept["error"]
    assert slept["figures"]["started"] is True and slept["wall_s"] < 4 + 1
    grandchild = slept["figures"]["grandchild_pid"]
    assert not alive(grandchild), "the check's grandchild (own session) outlived the kill"

    hung = checks_["hangs_in_command"]
    assert hung["status"] == "timeout" and "sleeper ran past" in hung["error"] and hung["figures"]["started"]
    assert hung["wall_s"] < 10

    assert checks_["passes"]["status"] == "passed" and checks_["passes"]["figures"] == {"answer": 42}
    assert checks_["hogs"]["status"] == "timeout"
    assert checks_["never_reached"]["status"] == "skipped" and checks_["never_reached"]["error"].startswith("budget:")
    assert [c["name"] for c in report["checks"]][: len(REGISTRY)] == REGISTRY
    assert all(checks_[n]["error"] == "not selected (--only)" for n in REGISTRY)
    assert (tmp_path / "out" / "report.md").read_text().count("| raises | failed |") == 1
    assert "boom on purpose" in proc.stdout


def test_budget_reserves_and_needs():
    later = [Check("later", "m:f", 60, reserve_s=100)]
    assert plan_cap(Check("a", "m:f", 45), later, seconds_left=420) == 45
    assert plan_cap(Check("a", "m:f", 45), later, seconds_left=120) == 20  # 100 s stay for `later`
    assert plan_cap(Check("rest", "m:f", None), [], seconds_left=250) == 250
    all_checks = registry(tiny=False, data_source="x.tar.gz")
    chosen, left_out = select(all_checks, ["fp16"], ["environment"])
    assert [c.name for c in chosen] == ["data", "fp16"]
    assert left_out["environment"] == "left out on request (--skip)" and left_out["bf16"] == "not selected (--only)"
    # The GPU plan, by importance: what every figure needs, the headline throughput and the quality
    # verdict first; compile and CUDA graphs (the least certain) last of the capped checks; the full
    # run at the end takes the rest and always keeps its reserve.
    names = [c.name for c in all_checks]
    assert names[:4] == ["environment", "data", "bench_64", "quality_64"]
    assert names[-3:] == ["compile_default", "compile_reduce_overhead", "full_run"]
    full = all_checks[-1]
    assert full.cap_s is None and full.reserve_s >= full.min_s >= 60
    # Every capped GPU check can start with a minimum it can succeed in, and none is starved by the reserve.
    assert all(c.min_s >= 25 and c.cap_s >= c.min_s for c in all_checks[2:-1])


def test_overflow_verdict():
    assert judge_overflow(2.0**40, 2.0**14, 20, 6)[1] is None
    figures, problem = judge_overflow(2.0**40, 2.0**14, 0, 0)
    assert figures["scale_halvings"] == 26 and "not counted" in problem
    assert "halved 26" in judge_overflow(2.0**40, 2.0**14, 3, 0)[1]
    assert "never fell" in judge_overflow(2.0**40, 2.0**40, 0, 0)[1]


def test_cuda_graph_skips_fail_reduce_overhead():
    """Inductor's "skipping cudagraphs" (TORCH_LOGS=cudagraphs) or its skip counter fail the check; graph
    breaks are counted from the counters or, without them, from the log."""
    log = (
        "step 50/300 ...\n"
        "V1130 torch/_inductor/cudagraph_utils.py] [__cudagraphs] skipping cudagraphs due to mutated inputs (2 instances)\n"
        "V1130 torch/_dynamo/symbolic_convert.py] [__graph_breaks] Graph break in user code at step.py:90\n"
    )
    figures, problem = cudagraph_verdict(log, {})
    assert figures["cudagraph_skips"] == 1 and figures["graph_breaks"] == 1
    assert "mutated inputs" in problem and figures["cudagraph_skip_reasons"] == ["mutated inputs (2 instances)"]
    figures, problem = cudagraph_verdict("clean log", {"inductor": {"cudagraph_skips": 3}, "graph_break": {"x": 2}})
    assert figures == {"cudagraph_skips": 3, "graph_breaks": 2} and "3 time(s)" in problem
    assert cudagraph_verdict("clean log", {"inductor": {"cudagraph_skips": 0}}) == (
        {"cudagraph_skips": 0, "graph_breaks": 0},
        None,
    )


def test_quality_verdict_says_worse_only_beyond_seed_spread():
    def rows(arm, fids):
        return [{"arm": arm, "seed": i, "bn_stats": "running", "fid": f} for i, f in enumerate(fids)]

    close = quality_verdict(rows("classic", [110, 118, 114]) + rows("ours", [116, 112, 120]))
    assert close["ours/running"]["verdict"] == "within seed spread" and close["classic/running"]["fid_mean"] == 114
    worse = quality_verdict(rows("classic", [110, 118, 114]) + rows("ours", [170, 165, 175]))
    assert worse["ours/running"]["verdict"] == "worse" and worse["ours/running"]["diff_vs_baseline"] == 56
    assert quality_verdict(rows("classic", [100, 60, 140]) + rows("ours", [150]))["ours/running"]["verdict"].startswith(
        "one seed"
    )


def test_the_verdict_reads_each_run_s_late_generators_not_its_last_one():
    """A GAN's FID swings from step to step: a run whose last generator happens to be bad is judged by
    its mean from half the run on, the earlier half of the run not counted."""

    def run(arm, seed, fids):  # FID at steps 500, 1000, 1500, 2000
        return [
            {"arm": arm, "seed": seed, "bn_stats": "running", "steps": t, "fid": f, "diversity": 0.9}
            for t, f in zip((500, 1000, 1500, 2000), fids, strict=True)
        ]

    records = [*run("classic", 0, [99, 12, 10, 8]), *run("ours", 0, [99, 9, 10, 20])]
    means = {r["arm"]: r for r in late_means(records, 2000)}
    assert means["classic"]["fid"] == 10 and means["ours"]["fid"] == 13  # (12+10+8)/3, (9+10+20)/3
    assert means["ours"]["steps"] == [1000, 1500, 2000]


def test_optional_tools_never_fail_and_never_hang(tmp_path, monkeypatch):
    """git and nvidia-smi are optional: missing, failing or hung, they give a note, not an error."""
    import tools.gpu_check.checks as checks

    slow = tmp_path / "bin" / "nvidia-smi"
    slow.parent.mkdir()
    slow.write_text(f"#!/bin/sh\nexec {sys.executable} -c 'import time; time.sleep(30)'\n")
    slow.chmod(0o755)
    failing = tmp_path / "bin" / "git"
    failing.write_text("#!/bin/sh\necho 'fatal: not a git repository' >&2\nexit 128\n")
    failing.chmod(0o755)
    monkeypatch.setenv("PATH", str(slow.parent))
    monkeypatch.setattr(checks, "COMMAND_TIMEOUT_S", 1)
    start = time.monotonic()
    assert optional_output(["nvidia-smi"]) == "(nvidia-smi did not answer within 1s)"
    assert time.monotonic() - start < 5
    assert optional_output(["git", "rev-parse", "HEAD"]).startswith("(git exited 128: fatal: not a git")
    assert optional_output(["no-such-tool"]) is None


def test_reading_runs_and_bench_output():
    records = [
        {"step": 50, "images_per_s": 100.0, "loss_D": 1.0, "loss_G": 2.0, "diversity": 0.5},
        {"step": 100, "images_per_s": 6400.0, "loss_D": 1.0, "loss_G": 2.0, "gpu_mem_peak_GiB": 1.5, "diversity": 0.6},
        {"step": 150, "images_per_s": 6000.0, "loss_D": float("nan"), "loss_G": 2.0, "gpu_mem_peak_GiB": 1.25},
    ]
    figures = training_figures(records, 64)
    assert figures["images_per_s"] == 6200.0 and figures["ms_per_step"] == pytest.approx(1000 * 64 / 6200, rel=1e-3)
    assert figures["losses_finite"] is False and figures["first_nonfinite_step"] == 150
    assert figures["gpu_mem_peak_GiB"] == 1.5 and figures["steps"] == 150 and "diversity" not in figures
    assert training_figures(records[:2], 64)["diversity"] == 0.6
    with pytest.raises(CheckFailed):
        training_figures([], 64)

    line = (
        "50000 images, 781 steps/epoch of 64 images (32 per process x 2), 19525 steps in all; "
        "device cuda:0, precision bf16, SyncBatchNorm"
    )
    assert startup_figures("x\n" + line + "\ny") == {
        "images": 50000,
        "steps_per_epoch": 781,
        "global_batch": 64,
        "per_process": 32,
        "processes": 2,
        "total_steps": 19525,
        "device": "cuda:0",
        "precision": "bf16",
        "norm": "SyncBatchNorm",
    }
    rank = "[gpu check] rank 1/2 backend gloo device cuda:0 collectives ok bypass_device_map true"
    assert group_ranks("x\n" + rank) == [
        {"rank": 1, "world": 2, "backend": "gloo", "device": "cuda:0", "collectives": "ok", "bypass_device_map": "true"}
    ]

    bench = {
        "results": [
            {"name": "ours", "images_per_s": 8000.0, "ms_per_step": 8.0, "peak_memory_mb": 900.0,
             "memory_kind": "CUDA max allocated", "steps": 50, "flops_per_step": 8e10, "precision": "bf16",
             "cudnn_benchmark": True, "tf32_convolutions": True},
            {"name": "reference", "images_per_s": 2000.0, "ms_per_step": 32.0, "peak_memory_mb": 700.0,
             "memory_kind": "CUDA max allocated", "steps": 50, "flops_per_step": 8e10, "precision": "no",
             "cudnn_benchmark": True, "tf32_convolutions": True},
        ],
        "bf16_matmul_tflops": 700.0,
    }  # fmt: skip
    _, figures = bench_figures(bench)
    assert figures["speedup_vs_reference"] == 4.0 and figures["ours_tflops"] == 10.0
    assert figures["reference_images_per_s"] == 2000.0 and figures["memory_kind"] == "CUDA max allocated"
    assert figures["ours_cudnn_benchmark"] is figures["reference_cudnn_benchmark"] is True
    assert figures["reference_precision"] == "no" and figures["reference_tf32_convolutions"] is True


def test_samples_are_cut_to_the_file_limit(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (300, 16, 16, 3), dtype=np.uint8)  # noise: barely compresses
    n, size = save_npz_within(images, tmp_path / "all.npz", 10**6)
    assert n == 300 and size <= 10**6
    n, size = save_npz_within(images, tmp_path / "cut.npz", 100_000)
    assert 100 < n < 300 and size <= 100_000
    with np.load(tmp_path / "cut.npz") as archive:
        np.testing.assert_array_equal(archive["arr_0"], images[:n])


@pytest.mark.slow
def test_a_check_killed_at_its_cap_reports_what_its_run_wrote(tmp_path):
    """The check recorded nothing itself before the kill (a compile that overran); its run's metrics.jsonl did."""
    proc, report, _ = gpu_check(
        tmp_path / "out",
        "--device",
        "cpu",
        "--only",
        "trains_past_cap",
        "--extra-check",
        f"{FIXTURES}:trains_past_cap:6",
    )
    killed = by_name(report)["trains_past_cap"]
    assert killed["status"] == "timeout" and "cap of 6s" in killed["error"]
    figures = killed["figures"]
    assert figures["steps"] == 150 and figures["images_per_s"] == 3100.0 and figures["diversity"] == 0.64
    assert figures["losses_finite"] is True and "steps" in figures["figures_from_metrics_jsonl"]
    assert "| trains_past_cap | timeout |" in (tmp_path / "out" / "report.md").read_text()


def _wait_for(path: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and "leaked_pid" in path.read_text():
            return
        time.sleep(0.2)
    raise AssertionError(f"{path} never held the leaked pid")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL then a rerun"])
def test_stopping_the_runner_leaves_nothing_running(tmp_path, how):
    """A check's command in its own session outlives neither a stopped runner nor, after SIGKILL (which the
    runner cannot catch), the next run in the same work folder."""
    out = tmp_path / "out"
    args = ["--device", "cpu", "--only", "leaves_a_process", "--extra-check", f"{FIXTURES}:leaves_a_process:120"]
    runner = subprocess.Popen(gpu_check_command(out, *args), cwd=REPO, env=trainer_env(), stdout=subprocess.DEVNULL)
    result = tmp_path / "work" / "checks" / "leaves_a_process" / "result.json"
    _wait_for(result)
    leaked = json.loads(result.read_text())["figures"]["leaked_pid"]
    assert alive(leaked)
    if how == "SIGTERM":
        runner.send_signal(signal.SIGTERM)
        assert runner.wait(timeout=30) == 1
        report = json.loads((out / "report.json").read_text())
        assert by_name(report)["leaves_a_process"]["error"].startswith("stopped from outside (SIGTERM)")
    else:
        runner.kill()
        runner.wait(timeout=30)
        assert alive(leaked)  # nobody could clean up
        proc, _, _ = gpu_check(out, "--device", "cpu", "--only", "passes", "--extra-check", f"{FIXTURES}:passes")
        # the leaked command and the killed runner's check process
        assert f"stopped 2 process(es) a previous run left in {tmp_path / 'work'}" in proc.stdout
    deadline = time.monotonic() + 10
    while alive(leaked) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(leaked)


def path_without(*names: str, root: Path) -> str:
    """A PATH with every program of this one except `names` (linked into one folder)."""
    folder = root / "bin"
    folder.mkdir()
    for directory in os.environ["PATH"].split(os.pathsep):
        if not os.path.isdir(directory):
            continue
        for entry in os.scandir(directory):
            target = folder / entry.name
            if entry.name not in names and not target.exists() and os.access(entry.path, os.X_OK):
                target.symlink_to(entry.path)
    return str(folder)


@pytest.mark.slow
def test_tiny_cpu_run_without_git_or_nvidia_smi_passes_every_check_a_cpu_can_run(tmp_path):
    """The GPU command at toy size on the CPU, as on a copy of the tree with no git and no nvidia-smi:
    every check that can run on a CPU passes; those that need CUDA say why they were skipped after
    running as far as a CPU allows (fp16 up to the trainer's refusal, one-rank NCCL as gloo)."""
    env = trainer_env()
    env["PATH"] = path_without("git", "nvidia-smi", root=tmp_path)
    out = tmp_path / "out"
    # A budget for a loaded 2-core machine (the checks' own caps still apply); about 6 minutes when idle.
    proc, report, wall = gpu_check(out, "--device", "cpu", "--tiny", "--budget-s", "1500", timeout=1800, env=env)
    checks_ = by_name(report)
    assert [c["name"] for c in report["checks"]] == REGISTRY
    problems = {n: c["error"] for n, c in checks_.items() if c["status"] in ("failed", "timeout")}
    assert not problems and proc.returncode == 0, proc.stdout[-3000:]
    needs_cuda = {"fp16", "fp16_overflow", "one_rank_nccl", "compile_reduce_overhead"}
    assert {n for n, c in checks_.items() if c["status"] == "skipped"} == needs_cuda
    print(f"tiny GPU check on the CPU: {wall:.0f}s")

    environment = checks_["environment"]["figures"]
    # No git: the code is named by a bundle's commit.txt if the checkout has one, and by the tree's digest.
    assert environment["commit_from"] != "git" and environment["nvidia_smi"] is None and environment["source_digest"]
    for name in ("fp16", "fp16_overflow"):  # ran up to the trainer's refusal
        assert "fp16 needs a GPU" in checks_[name]["error"]
    assert "ran with gloo and passed" in checks_["one_rank_nccl"]["error"]
    assert checks_["one_rank_nccl"]["figures"]["ranks"][0]["collectives"] == "ok"
    assert "CUDA graphs" in checks_["compile_reduce_overhead"]["error"]
    fp32 = checks_["fp32"]["figures"]
    assert fp32["losses_finite"] and fp32["steps"] == 6 and fp32["precision"] == "no" and fp32["images_per_s"] > 0
    assert 0 <= fp32["diversity"] < 1.5 and fp32["diversity_judged"] is False
    two = checks_["two_processes_gloo"]["figures"]
    assert two["processes"] == 2 and [(r["backend"], r["collectives"]) for r in two["ranks"]] == [("gloo", "ok")] * 2
    assert checks_["compile_default"]["figures"]["cudagraph_skips"] == 0
    assert checks_["bench_64"]["figures"]["speedup_vs_reference"] > 0
    assert checks_["bench_64"]["figures"]["reference_cudnn_benchmark"] is True
    quality = checks_["quality_64"]["figures"]
    # the last step's records; the verdict reads each run's mean from half the run on (steps 2, 3, 4)
    assert {(r["arm"], r["bn_stats"], r["steps"]) for r in quality["runs"]} == {
        ("classic", "running", 4),
        ("ours", "running", 4),
    }
    assert set(quality["verdicts"]) == {"classic/running", "ours/running"}
    assert all(math.isfinite(r["fid"]) and r["diversity"] >= 0 for r in quality["runs"])

    run = checks_["full_run"]["figures"]
    assert run["completed"] and run["steps_done"] == 12 and run["samples_diversity"] >= 0
    assert run["samples"] == run["samples_returned"] == 200 and run["sample_shape"] == [200, 32, 32, 3]
    with np.load(out / "samples.npz") as archive:
        assert archive["arr_0"].shape == (200, 32, 32, 3) and archive["arr_0"].dtype == np.uint8
    files = sorted(p.name for p in out.iterdir())
    assert files == [
        "generator.safetensors",
        "grid_full_run.png",
        "logs.tar.gz",
        "real.png",
        "report.json",
        "report.md",
        "samples.npz",
    ]
    assert all((out / f).stat().st_size <= 15 * 2**20 for f in files)  # safely under a 16 MiB limit
    text = (out / "report.md").read_text()
    assert "## Answers" in text and "| full_run | passed |" in text and "two ranks on one device, gloo: passed" in text


def test_bundle_script_packs_what_an_offline_node_needs(tmp_path):
    """tools/bundle_offline.sh: wheels from a folder (nothing to download here), the dataset as a tarball
    made from a folder, the classifier weights, the commit; a size limit it cannot meet fails it."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for name in ("omegaconf-2.4.0", "torch_fidelity-0.4.0", "tqdm-4.70.1", "wandb-0.31.0"):
        (wheels / f"{name}-py3-none-any.whl").write_bytes(b"wheel")
    data = tmp_path / "cifar"
    for split in ("train", "test"):
        (data / split / "cats").mkdir(parents=True)
        (data / split / "cats" / "0.jpg").write_bytes(b"jpeg")
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"weights")
    script = str(REPO / "tools" / "bundle_offline.sh")
    out = tmp_path / "bundle"
    args = [script, "--data", str(data), "--wheels", str(wheels), "--classifier", str(weights), "--out", str(out)]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (out / "wheels").iterdir()) == [
        "omegaconf-2.4.0-py3-none-any.whl",
        "torch_fidelity-0.4.0-py3-none-any.whl",
        "tqdm-4.70.1-py3-none-any.whl",
    ]  # no wandb unless asked: the GPU check does not need it
    import tarfile

    with tarfile.open(out / "cifar10-jpg.tar.gz") as archive:
        assert sorted(archive.getnames()) == sorted(
            ["train", "train/cats", "train/cats/0.jpg", "test", "test/cats", "test/cats/0.jpg"]
        )
    assert (out / "classifier.safetensors").read_bytes() == b"weights"
    assert len((out / "commit.txt").read_text().split()[0]) == 40
    assert "checkout:" in proc.stdout and "together" in proc.stdout
    too_small = subprocess.run([*args, "--max-mib", "1"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert too_small.returncode == 1 and "over the --max-mib 1 limit" in too_small.stderr
    missing = subprocess.run([script, "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "--data is required" in missing.stderr


@pytest.mark.slow
def test_a_rerun_in_the_same_work_folder_reuses_the_data(tmp_path):
    """The tarball is unpacked and packed once per work folder; a rerun (say, of what the budget skipped)
    goes straight to its checks."""
    for attempt, reused in ((1, False), (2, True)):
        out = tmp_path / f"out{attempt}"
        proc, report, _ = gpu_check(out, "--device", "cpu", "--tiny", "--only", "data")
        data = by_name(report)["data"]
        assert data["status"] == "passed" and data["figures"]["reused_from_earlier_run"] is reused, proc.stdout
