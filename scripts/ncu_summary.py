#!/usr/bin/env python3
"""Summarises `ncu --csv --page raw --metrics gpu__time_duration.sum` output of an `llmq train` run:
per-kernel GPU time of the last complete training step (steps end with the AdamW kernels), grouped
by kernel name, then the step's kernels in launch order (for matching GEMMs to model matmuls)."""
import csv, io, re, sys

text = open(sys.argv[1], errors="replace").read()
start = text.find('"ID"')
if start < 0:
    sys.exit("no ncu CSV table in " + sys.argv[1])
rows = list(csv.DictReader(io.StringIO(text[start:])))
rows = [r for r in rows if r.get("gpu__time_duration.sum", "").replace(",", "").replace(".", "").isdigit()]
names = [r["Kernel Name"] for r in rows]
ns = [float(r["gpu__time_duration.sum"].replace(",", "")) for r in rows]
# step boundaries: the last adamw kernel of each run of adamw kernels
ends = [i for i, n in enumerate(names) if "adamw" in n and (i + 1 == len(names) or "adamw" not in names[i + 1])]
if len(ends) >= 2:
    lo, hi = ends[-2] + 1, ends[-1] + 1
else:
    lo, hi = 0, len(names)
step = list(zip(names[lo:hi], ns[lo:hi]))
total = sum(t for _, t in step)
print(f"kernels in the last step: {len(step)}, GPU time {total / 1e6:.2f} ms (sum of kernel durations)")

def short(n):
    n = re.sub(r"\(.*", "", n)
    return n[:90]

agg = {}
for n, t in step:
    k = short(n)
    c, s = agg.get(k, (0, 0.0))
    agg[k] = (c + 1, s + t)
print(f"{'ms':>9} {'share':>6} {'calls':>6}  kernel")
for k, (c, s) in sorted(agg.items(), key=lambda x: -x[1][1]):
    print(f"{s / 1e6:9.3f} {100 * s / total:5.1f}% {c:6d}  {k}")
print("\nlaunch order (first block + head; us):")
for i, (n, t) in enumerate(step):
    if i < 140 or i >= len(step) - 60:
        print(f"{i:5d} {t / 1e3:9.1f}  {short(n)}")
