"""One short table from the JSON files of benchmarks/throughput.py and benchmarks/hf_baseline_gpu.py (anchors.json),
with MFU against the bf16 matmul rate measured in the same call when anchors.json holds it.

    python benchmarks/summarize.py $OUT/throughput_*.json $OUT/anchors.json"""
import json
import os
import sys


def rows_of(path):
    with open(path) as handle:
        data = json.load(handle)
    name = os.path.basename(path)
    if name.startswith("anchors"):  # hf_baseline_gpu.py: its own row format
        return data.get("peak_tflops"), [
            dict(run=f"baseline {r['name']}", tokens_per_s=r["tokens_per_s"], seq_per_s=r["seq_per_s"],
                 tflops=r["tflops"], peak_mem_GB=r["peak_mem_GB"]) for r in data["rows"]]
    label = name[len("throughput_"):-len(".json")]
    rows = []
    for r in data["rows"]:
        if "error" in r:
            rows.append(dict(run=f"{label} {r['side']}", error=r["error"].strip().splitlines()[-1][:100]))
        else:
            rows.append(dict(run=f"{label} {r['side']}", tokens_per_s=r["tokens_per_s"], seq_per_s=r["seq_per_s"],
                             tflops=r["tflops"], peak_mem_GB=r["peak_mem_GB"], step_ms=r["step_ms"]))
    if "ours_over_hf_tokens_per_s" in data:
        rows.append(dict(run=f"{label} ours/hf", ratio=data["ours_over_hf_tokens_per_s"]))
    return None, rows


def main(paths):
    peak, rows = None, []
    for path in paths:
        if not os.path.exists(path):
            continue
        file_peak, file_rows = rows_of(path)
        peak = peak or file_peak
        rows += file_rows
    print(f"\nrun | tokens/s | seq/s | ms/step | TFLOP/s | MFU % (of measured {peak and round(peak)} TFLOP/s) | peak GB")
    for r in rows:
        if "error" in r:
            print(f"{r['run']} | FAILED: {r['error']}")
        elif "ratio" in r:
            print(f"{r['run']} | x{r['ratio']} tokens/s")
        else:
            mfu = f"{100 * r['tflops'] / peak:.1f}" if peak else "-"
            print(f"{r['run']} | {r['tokens_per_s']:.0f} | {r['seq_per_s']:.1f} | {r.get('step_ms', '-')} | "
                  f"{r['tflops']} | {mfu} | {r['peak_mem_GB']}")


if __name__ == "__main__":
    main(sys.argv[1:])
