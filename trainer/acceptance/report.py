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

from trainer.acceptance.runner import STATUSES, Result, write_json

# Figures shown in report.md's table per check (report.json has them all).
HEADLINES = (
    "images_per_s",
    "ms_per_step",
    "gpu_mem_peak_GiB",
    "steps",
    "loss_D_final",
    "loss_G_final",
    "final_loss_scale",
    "scale_halvings",
    "skipped_steps_D",
    "skipped_steps_G",
    "recompiles",
    "compile_s_estimate",
    "cudagraph_skips",
    "ours_images_per_s",
    "reference_images_per_s",
    "speedup_vs_reference",
    "ours_peak_memory_mb",
    "device",
    "norm",
    "steps_done",
    "total_steps",
    "completed",
    "extrapolated_total_s",
    "samples",
    "samples_returned",
    "train_images",
    "device_name",
    "torch",
    "note",
)
THROUGHPUT = ("bf16", "fp16", "fp32", "fp16_overflow", "two_processes", "compile_default", "compile_reduce_overhead")


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


def markdown(meta: Mapping[str, Any], results: Sequence[Result]) -> str:
    by_name = {r.name: r for r in results}
    env = by_name["environment"].figures if "environment" in by_name else {}
    counts = summary(results)
    lines = [
        "# GPU acceptance report",
        "",
        f"- command: `{meta['command']}`",
        f"- device: {meta['device']}"
        + (f" ({env.get('device_name')}, {env.get('device_memory_GiB')} GiB)" if env.get("device_name") else "")
        + (" at toy size (--tiny)" if meta["tiny"] else ""),
        *(
            [
                f"- software: torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), accelerate "
                f"{env.get('accelerate')}, python {env.get('python')}; commit {env.get('git_commit')}"
            ]
            if env
            else []
        ),
        f"- started {meta['started_at']}, {meta['wall_s']:.0f}s of a {meta['budget_s']:.0f}s budget",
        "- checks: " + ", ".join(f"{counts[s]} {s}" for s in STATUSES),
        "",
        "| check | status | time / cap (s) | figures | error |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        cap = "-" if r.cap_s is None else f"{r.cap_s:.0f}"
        error = (r.error or "").splitlines()[0][:200] if r.error else ""
        lines.append(f"| {r.name} | {r.status} | {r.wall_s:.0f} / {cap} | {_cell(headline(r))} | {_cell(error)} |")

    rows = [by_name[n] for n in THROUGHPUT if n in by_name and by_name[n].figures.get("images_per_s")]
    if rows:
        lines += [
            "",
            "## Training throughput (global batch, steady state: median of log windows after the first)",
            "",
            "| run | images/s | ms/step | peak GPU memory (GiB) |",
            "|---|---|---|---|",
        ]
        for r in rows:
            f = r.figures
            peak = _fmt(f.get("gpu_mem_peak_GiB"))
            lines.append(f"| {r.name} | {f['images_per_s']:.0f} | {f['ms_per_step']:.2f} | {peak} |")
    benches = [by_name[n] for n in ("bench_64", "bench_512") if n in by_name and by_name[n].figures]
    if benches:
        lines += ["", "## trainer.bench: ours against the classic loop", ""]
        lines += [
            "| batch | ours img/s | classic img/s | speed-up | ours peak MB | bf16 matmul TFLOP/s |",
            "|---|---|---|---|---|---|",
        ]
        for r in benches:
            f = r.figures
            keys = ("global_batch", "ours_images_per_s", "reference_images_per_s", "speedup_vs_reference")
            cells = [_fmt(f.get(k)) for k in (*keys, "ours_peak_memory_mb", "bf16_matmul_tflops")]
            lines.append("| " + " | ".join(cells) + " |")
    full = by_name.get("full_run")
    if full and full.figures:
        f = full.figures
        recipe = "toy size, --tiny" if meta["tiny"] else "the classic recipe, 25 epochs"
        lines += ["", f"## Full run ({recipe})", ""]
        lines.append(
            f"- {f.get('steps_done')} of {f.get('total_steps')} steps ({f.get('epochs_done')} epochs) in "
            f"{f.get('wall_s')}s end to end; training windows {f.get('train_s')}s at {f.get('images_per_s_overall')} img/s"
            + (
                "; completed"
                if f.get("completed")
                else f"; cut by the cap, extrapolated {f.get('extrapolated_total_s')}s"
            )
        )
        if f.get("samples"):
            lines.append(
                f"- {f['samples']} samples {f.get('sample_shape')} uint8, sha256 {f.get('samples_sha256')}; "
                f"returned: {f.get('samples_note')}"
            )
        if "grid_full_run.png" in f.get("files", {}):
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
    logs_note = archive_logs(logs_root, out / "logs.tar.gz", limit) if logs_root.is_dir() else "no logs"
    data = {
        **meta,
        "summary": summary(results),
        "logs": f"logs.tar.gz ({logs_note})",
        "checks": [asdict(r) for r in results],
    }
    write_json(out / "report.json", data)
    (out / "report.md").write_text(markdown(meta, results))
