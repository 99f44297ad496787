"""report.json (everything), report.md (for people), logs.tar.gz (every command's output), in the out folder.

Rewritten after every check, so a run stopped from outside still leaves a report of what it did.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tools.gpu_check.runner import STATUSES, Result, write_json

# Figures shown in report.md's table of checks (report.json has them all).
HEADLINES = (
    "images_per_s",
    "ms_per_step",
    "gpu_mem_peak_GiB",
    "steps",
    "diversity",
    "loss_D_final",
    "loss_G_final",
    "final_loss_scale",
    "scale_halvings",
    "skipped_steps_D",
    "skipped_steps_G",
    "recompile_messages",
    "graph_breaks",
    "compile_s_estimate",
    "cudagraph_skips",
    "ours_images_per_s",
    "reference_images_per_s",
    "speedup_vs_reference",
    "device",
    "norm",
    "steps_done",
    "total_steps",
    "completed",
    "extrapolated_total_s",
    "samples",
    "samples_diversity",
    "samples_returned",
    "train_images",
    "device_name",
    "torch",
    "commit",
    "note",
)
PRECISIONS = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}
TRAINING = ("bf16", "fp16", "fp32", "one_rank_nccl", "two_processes_gloo", "compile_default", "compile_reduce_overhead")


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    return str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def headline(result: Result) -> str:
    shown = [f"{k} {_fmt(result.figures[k])}" for k in HEADLINES if result.figures.get(k) is not None]
    return ", ".join(shown)


def summary(results: Sequence[Result]) -> dict[str, int]:
    return {status: sum(r.status == status for r in results) for status in STATUSES}


def _status(r: Result | None) -> str:
    if r is None:
        return "not run"
    first = (r.error or "").strip().splitlines()
    return r.status + (f" ({_cell(first[0][:160])})" if first and r.status != "passed" else "")


def answers(meta: Mapping[str, Any], by_name: Mapping[str, Result]) -> list[str]:
    """The headline questions, answered in order from the checks' figures (or why not)."""
    env = by_name["environment"].figures if "environment" in by_name else {}
    lines = ["## Answers", ""]
    fp32 = "fp32"
    if float(env.get("capability") or 0) >= 8:  # Ampere and later: fp32 convolutions may run as TF32
        fp32 = (
            f"fp32 (TF32 convolutions {'on' if env.get('tf32_convolutions') else 'off'}, "
            f"TF32 matmul {'on' if env.get('tf32_matmul') else 'off'})"
        )

    # 1. Does the trainer train here, in each precision, without collapse?
    lines.append("**Does it train on this device?**")
    for name in ("bf16", "fp16", "fp32"):
        r = by_name.get(name)
        label = fp32 if name == "fp32" else name
        f = r.figures if r else {}
        extra = (
            f", {f['images_per_s']:.0f} img/s, diversity {_fmt(f.get('diversity'))}" if f.get("images_per_s") else ""
        )
        lines.append(f"- {label}: {_status(r)}{extra}")
    r = by_name.get("fp16_overflow")
    if r:
        f = r.figures
        counted = (
            f" (skipped D {f.get('skipped_steps_D')} + G {f.get('skipped_steps_G')} = halvings {f.get('scale_halvings')})"
            if "scale_halvings" in f
            else ""
        )
        lines.append(f"- fp16 overflow skips counted: {_status(r)}{counted}")

    # 2. How fast, against the classic loop?
    benches = [
        by_name[n] for n in ("bench_64", "bench_512") if n in by_name and by_name[n].figures.get("ours_images_per_s")
    ]
    lines += ["", "**How fast, against the classic PyTorch DCGAN loop?** (`python -m trainer.bench`)"]
    if benches:
        lines += [
            "",
            "| global batch | ours img/s | classic img/s | speed-up | ours precision | cudnn.benchmark (ours / classic) | TF32 conv. (classic) | ours peak MB |",
            "|---:|---:|---:|---:|---|---|---|---:|",
        ]
        for r in benches:
            f = r.figures
            lines.append(
                f"| {_fmt(f.get('global_batch'))} | {_fmt(f.get('ours_images_per_s'))} | {_fmt(f.get('reference_images_per_s'))} | "
                f"{_fmt(f.get('speedup_vs_reference'))}x | {_fmt(f.get('ours_precision'))} | "
                f"{_fmt(f.get('ours_cudnn_benchmark'))} / {_fmt(f.get('reference_cudnn_benchmark'))} | "
                f"{_fmt(f.get('reference_tf32_convolutions'))} | {_fmt(f.get('ours_peak_memory_mb'))} |"
            )
        lines.append(
            '\n"ours" is the trainer\'s GAN step and data path (packed data, on-device resize, channels_last, AMP, '
            "fused Adam) without the loop's logging, health checks and checkpoints; the training runs below include them. "
            '"classic" is the PyTorch example\'s loop (PIL DataLoader with 2 workers, fp32, Sigmoid + BCELoss).'
        )
    else:
        lines.append(f"- not measured: bench_64 {_status(by_name.get('bench_64'))}")
    rows = [by_name[n] for n in TRAINING if n in by_name and by_name[n].figures.get("images_per_s")]
    if rows:
        lines += ["", "Training runs (the whole loop; steady state: median of the log windows after the first):", ""]
        lines += [
            "| run | precision | images/s | ms/step | peak GPU GiB | diversity |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for r in rows:
            f = r.figures
            precision = fp32 if f.get("precision") == "no" else _fmt(f.get("precision"))
            lines.append(
                f"| {r.name} | {precision} | {f['images_per_s']:.0f} | {_fmt(f.get('ms_per_step'))} | "
                f"{_fmt(f.get('gpu_mem_peak_GiB'))} | {_fmt(f.get('diversity'))} |"
            )

    # 3. A full run
    full = by_name.get("full_run")
    recipe = "toy size, --tiny" if meta["tiny"] else "the classic recipe, 25 epochs, 64x64, batch 64"
    lines += ["", f"**How long is a full run?** ({recipe})"]
    if full and full.figures.get("steps_done"):
        f = full.figures
        how = (
            "completed"
            if f.get("completed")
            else f"cut by the cap, extrapolated to {f.get('extrapolated_total_s')}s end to end"
        )
        lines.append(
            f"- {f.get('steps_done')} of {f.get('total_steps')} steps ({f.get('epochs_done')} epochs) in {f.get('wall_s')}s "
            f"end to end ({how}); training windows {f.get('train_s')}s at {f.get('images_per_s_overall')} img/s"
        )
        if f.get("samples"):
            lines.append(
                f"- {f['samples']} samples {f.get('sample_shape')} uint8, diversity {_fmt(f.get('samples_diversity'))} "
                f"of real images'; sha256 {f.get('samples_sha256')}; returned: {f.get('samples_note')}"
            )
    else:
        lines.append(f"- {_status(full)}")

    # 4. Sample quality at 64x64
    q = by_name.get("quality_64")
    size = "toy size" if meta["tiny"] else "64x64"
    lines += [
        "",
        f"**Does the trainer's default train as well as the classic loop?** ({size}, offline classifier FID, lower is better)",
    ]
    if q and q.figures.get("verdicts"):
        f = q.figures
        lines += [
            "",
            f"{len(f.get('seeds', []))} seeds x {f.get('steps')} steps per arm, {f.get('num_samples')} samples each; weights {f.get('weights')}",
            "",
        ]
        lines += [
            "| arm / BN statistics | seeds | FID mean | sd | vs classic | verdict |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for key, v in f["verdicts"].items():
            diff = f"{v['diff_vs_baseline']:+.2f} ± {_fmt(v.get('diff_se'))}" if "diff_vs_baseline" in v else "-"
            lines.append(
                f"| {key} | {v['seeds']} | {v['fid_mean']} | {_fmt(v.get('fid_sd'))} | {diff} | {v.get('verdict', '-')} |"
            )
        if f.get("note"):
            lines += ["", f["note"]]
    else:
        reached = (
            f"; steps reached: {q.figures['steps_reached_at_the_cap']}"
            if q and q.figures.get("steps_reached_at_the_cap")
            else ""
        )
        lines.append(f"- {_status(q)}{reached}")

    # 5. Several processes
    lines += ["", "**Do the distributed paths work?**"]
    for name, what in (
        ("one_rank_nccl", "NCCL, one rank (DDP device_ids=[0], SyncBatchNorm)"),
        ("two_processes_gloo", "two ranks on one device, gloo"),
    ):
        r = by_name.get(name)
        norm = f", {r.figures['norm']}" if r and r.figures.get("norm") else ""
        lines.append(f"- {what}: {_status(r)}{norm}")

    # 6. Compile
    lines += ["", "**torch.compile and CUDA graphs?**"]
    for name in ("compile_default", "compile_reduce_overhead"):
        r = by_name.get(name)
        f = r.figures if r else {}
        shown = ", ".join(
            f"{k} {_fmt(f[k])}"
            for k in ("images_per_s", "compile_s_estimate", "graph_breaks", "cudagraph_skips")
            if f.get(k) is not None
        )
        lines.append(f"- {name}: {_status(r)}" + (f"; {shown}" if shown else ""))
    return lines


def markdown(meta: Mapping[str, Any], results: Sequence[Result]) -> str:
    by_name = {r.name: r for r in results}
    env = by_name["environment"].figures if "environment" in by_name else {}
    counts = summary(results)
    lines = [
        "# GPU check report",
        "",
        f"- command: `{meta['command']}`",
        f"- device: {meta['device']}"
        + (
            f" ({env.get('device_name')}, {env.get('device_memory_GiB')} GiB, capability {env.get('capability')})"
            if env.get("device_name")
            else ""
        )
        + (" at toy size (--tiny): the figures test the tool, they measure nothing" if meta["tiny"] else ""),
        *(
            [
                f"- software: torch {env.get('torch')} (CUDA {env.get('torch_cuda')}, cuDNN {env.get('cudnn')}), accelerate "
                f"{env.get('accelerate')}, python {env.get('python')}; code: commit {env.get('commit')} "
                f"({env.get('commit_from')}), tree digest {env.get('source_digest')}"
            ]
            if env
            else []
        ),
        f"- started {meta['started_at']} on {meta['host']}, {meta['wall_s']:.0f}s of a {meta['budget_s']:.0f}s budget; work folder {meta['work']}",
        "- checks: " + ", ".join(f"{counts[s]} {s}" for s in STATUSES),
        "",
        *answers(meta, by_name),
        "",
        "## Every check",
        "",
        "| check | status | time / cap (s) | figures | error |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        cap = "-" if r.cap_s is None else f"{r.cap_s:.0f}"
        error = (r.error or "").splitlines()[0][:200] if r.error else ""
        lines.append(f"| {r.name} | {r.status} | {r.wall_s:.0f} / {cap} | {_cell(headline(r))} | {_cell(error)} |")
    full = by_name.get("full_run")
    if full and "grid_full_run.png" in full.figures.get("files", {}):
        lines += ["", "![last grid of the full run](grid_full_run.png)"]
    errors = [r for r in results if r.error and r.status in ("failed", "timeout")]
    if errors:
        lines += ["", "## Errors in full", ""]
        for r in errors:
            lines += [f"### {r.name} ({r.status})", "", "```", r.error.strip(), "```", ""]
    lines += ["", "Every figure, every check: report.json. Every command's output: logs.tar.gz.", ""]
    return "\n".join(lines)


def archive_logs(logs_root: Path, dest: Path, limit_bytes: int) -> str:
    """All check logs as one tar.gz; if it would pass the per-file limit, the largest logs are cut to
    their last 200 kB (a trainer log is small; this guards against a runaway one)."""
    cut = []
    for attempt in range(2):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            for path in sorted(p for p in logs_root.rglob("*") if p.is_file()):
                data = path.read_bytes()
                if attempt and len(data) > 200_000:
                    data = data[-200_000:]
                    cut.append(path.name)
                info = tarfile.TarInfo(str(path.relative_to(logs_root.parent)))
                info.size, info.mtime = len(data), int(path.stat().st_mtime)
                tar.addfile(info, io.BytesIO(data))
        if buffer.tell() <= limit_bytes:
            break
    dest.write_bytes(buffer.getvalue())
    return f"{dest.stat().st_size / 2**20:.2f} MiB" + (f", cut to their tails: {', '.join(cut)}" if cut else "")


def write_report(out: Path, meta: Mapping[str, Any], results: Sequence[Result], logs_root: Path, limit: int) -> None:
    # Safely under the per-file limit, as the samples are (1/16 spare).
    logs_note = archive_logs(logs_root, out / "logs.tar.gz", limit * 15 // 16) if logs_root.is_dir() else "no logs"
    data = {
        **meta,
        "summary": summary(results),
        "logs": f"logs.tar.gz ({logs_note})",
        "checks": [asdict(r) for r in results],
    }
    write_json(out / "report.json", data)
    (out / "report.md").write_text(markdown(meta, results))
