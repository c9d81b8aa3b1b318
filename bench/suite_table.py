"""The table of bench/gpu_suite.sh: reads DIR/rows/*.json (one bench/train_step.py --one row each),
DIR/matmul_peak.json and DIR/memory_gpu.json (bench/memory.py --gpu), writes DIR/rows.json and DIR/table.md (the
form docs/performance.md shows) and prints it. The QLoRA rows stand beside the CPU count of the same step
(bench/results/step_memory.json, written by bench/step_memory.py --json).

    python bench/suite_table.py bench/results/gpu_suite
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

# The GPU targets, by (variant, row): (seconds per step, peak GiB), None where there is none.
TARGETS = {
    ("klein-base-4b", "flux2"): (0.19, 9.6),
    ("klein-base-9b", "flux2"): (0.37, None),
    ("klein-base-4b", "flux2+fp8"): (None, 6.4),  # and no slower than the flux2 row
    ("klein-base-4b", "flux2+fwd"): (0.055, None),
}


def reference_of(row: dict) -> str:
    return "diffusers+compile+fwd" if row["forward_only"] else "diffusers+compile"


def verdict(row: dict, by_key: dict) -> str:
    target = TARGETS.get((row["variant"], row["row"]))
    if target is None:
        return ""
    seconds, gib = target
    if row["row"] == "flux2+fp8":
        bf16 = by_key.get((row["variant"], "flux2"))
        seconds = bf16["step_s"] if bf16 else None
    parts = []
    if seconds is not None:
        parts.append(f"<= {seconds:.3g} s: {'met' if row['step_s'] <= seconds else 'missed'}")
    if gib is not None and row.get("peak_gib") is not None:
        parts.append(f"<= {gib} GiB: {'met' if row['peak_gib'] <= gib else 'missed'}")
    return "; ".join(parts)


def table(rows: list[dict], peak: float | None) -> str:
    by_key = {(r["variant"], r["row"]): r for r in rows}
    device = rows[0]["device"] if rows else "?"
    lines = [f"Device: {device}" + (f", bf16 matmul peak {peak:.0f} TFLOP/s" if peak else ""), "",
             "| variant | row | checkpointed blocks | s/step (median) | min-max | peak GiB | LoRA TFLOP/s | % of peak "
             "| vs diffusers + compile | target |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = by_key.get((r["variant"], reference_of(r)))
        ratio = f"{r['step_s'] / ref['step_s']:.2f}" if ref else "-"
        pct = f"{100 * r['lora_tflops'] / peak:.0f}%" if peak else "-"
        gib = f"{r['peak_gib']:.2f}" if r.get("peak_gib") is not None else "-"
        gc = r["grad_ckpt"]
        lines.append(f"| {r['variant']} | {r['row']} | {gc} | {r['step_s']:.4f} | {r['step_s_min']:.4f}-"
                     f"{r['step_s_max']:.4f} | {gib} | {r['lora_tflops']:.1f} | {pct} | {ratio} | "
                     f"{verdict(r, by_key)} |")
    return "\n".join(lines) + "\n"


COUNTED = Path(__file__).resolve().parent / "results" / "step_memory.json"


def qlora_table(memory: dict, counted: list[dict]) -> str:
    """bench/memory.py --gpu's rows (measured peak) beside bench/step_memory.py's count of the same step."""
    gpu = memory.get("gpu", {})
    if not gpu.get("rows"):
        return f"QLoRA memory targets: {gpu.get('skipped', 'not run')}\n"
    by_key = {(r["variant"], r["res"], r["rank"]): r for r in counted
              if r["switch"] == "nf4" and r["optimizer"] == "adamw" and r["grad_ckpt"]}
    lines = [f"QLoRA memory targets on {gpu['device']} (NF4 base, gradient checkpointing, AdamW):", "",
             "| variant | resolution | rank | peak GiB (max allocated) | max reserved GiB | counted on the CPU GiB | s/step "
             "| target |",
             "|---|---|---|---|---|---|---|---|"]
    for r in gpu["rows"]:
        count = by_key.get((r["variant"], r["res"], r["rank"]))
        counted_gib = f"{count['peak'] / 2**30:.2f}" if count else "-"
        target = f"<= {r['target_gib']:.0f} GiB: {'met' if r['ok'] else 'missed'}" if r["target_gib"] else ""
        reserved = f"{r['reserved_gib']:.2f}" if r.get("reserved_gib") is not None else "-"
        lines.append(f"| {r['variant']} | {r['res']}^2 | {r['rank']} | {r['peak_gib']:.2f} | {reserved} | "
                     f"{counted_gib} | {r['step_s']:.3f} | {target} |")
    return "\n".join(lines) + "\n"


def main(folder: str) -> None:
    out = Path(folder)
    rows = []
    for path in sorted((out / "rows").glob("*.json"), key=lambda p: p.stat().st_mtime):  # the order they ran
        rows += json.loads(path.read_text())
    peak_file = out / "matmul_peak.json"
    peak = json.loads(peak_file.read_text()).get("matmul_peak_tflops") if peak_file.is_file() else None
    (out / "rows.json").write_text(json.dumps({"matmul_peak_tflops": peak, "rows": rows}, indent=2))
    text = table(rows, peak)
    memory_file = out / "memory_gpu.json"
    memory = json.loads(memory_file.read_text()) if memory_file.is_file() else {}
    counted = json.loads(COUNTED.read_text())["rows"] if COUNTED.is_file() else []
    text += "\n" + qlora_table(memory, counted)
    (out / "table.md").write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench/results/gpu_suite")
