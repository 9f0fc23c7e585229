"""Remake ``distattn/profiles/h100.json`` (``--network h100``) from published nccl-tests tables.

distattn fits ``t = alpha + factor * size / busbw`` per (collective, GPUs, nodes) to the tables
(``NetworkProfile.load``, what ``distattn cluster fit`` prints) and stores each fit as the two times it
predicts, at 1 MiB and at the largest size measured, so the package carries its own fits and not the
tables. Usage::

    .venv/bin/python scripts/make_h100_profile.py ../shared/data/profiles/published distattn/profiles/h100.json DATE
"""
import json, sys
from distattn.costmodel.network import NetworkProfile
from distattn.costmodel.network_csv import bus_factor

src, out, date = sys.argv[1], sys.argv[2], sys.argv[3]
pub = NetworkProfile.load(src)
rows = []
for (op, n, nodes), f in sorted(pub.fits.items()):
    top = round(f.max_bus_bytes / bus_factor(op, n))   # the largest size measured
    for s in sorted({min(2**20, top), top}):   # 1 MiB and the largest measured size, timed by the fit
        t = float(f.time_s(op, n, s)) * 1e6
        rows.append({"op": op, "world_size": n, "nodes": nodes, "size_bytes": s, "time_us": round(t, 3)})
source = ("h100: distattn's alpha-beta fits (distattn cluster fit, " + date + ") of the published nccl-tests "
          "tables in ../shared/data/profiles/published (SOURCES.md): xxrjun/nccl-tests-cluster example-cluster01 "
          "(HGX H100, 1-10 nodes, 400G-class IB), together-nccl-tests H100, NVIDIA dgxc-benchmarking DGX H100, "
          "awsome-distributed-training p5 EFA, dstack GCP A3 Mega and Nebius IB, SkyPilot GCP A3 Ultra (H200), "
          "HF Ultra-Scale Playbook 256MB node scaling; each fit stored as its times at 1 MiB and its largest "
          "measured size")
doc = {"source": source, "backend": "nccl", "gpus_per_node": pub.gpus_per_node, "strict": True}
lines = ["{" + ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in doc.items()) + ","]
lines.append(' "rows": [')
lines += ["  " + json.dumps(r, separators=(",", ":")) + ("," if i + 1 < len(rows) else "") for i, r in enumerate(rows)]
lines.append(" ]}")
open(out, "w").write("\n".join(lines) + "\n")
print(len(rows), "rows")
