#!/usr/bin/env python3
"""Turns a bench run directory (fio JSON per system) into the Markdown report."""
import json, os, platform, sys, datetime

run = sys.argv[1]
systems = [s for s in ["torus", "nbdkit-memory", "nbdkit-file", "ceph-rbd"] if os.path.exists(f"{run}/{s}.json")]

def load(s):
    txt = open(f"{run}/{s}.json").read()
    return {j["jobname"]: j for j in json.loads(txt[txt.index("{"):])["jobs"]}

data = {s: load(s) for s in systems}
jobs = list(data["torus"].keys())

def metrics(j):
    """(IOPS, MB/s, p99 us) summed over read and write."""
    r, w = j["read"], j["write"]
    iops = r["iops"] + w["iops"]
    mbs = (r["bw_bytes"] + w["bw_bytes"]) / 1e6
    p99 = max(x.get("clat_ns", {}).get("percentile", {}).get("99.000000", 0) for x in (r, w)) / 1000
    return iops, mbs, p99

print(f"# Benchmark results\n")
print(f"Run {os.path.basename(run)} on {platform.node()} ({os.cpu_count()} cores, "
      f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, {platform.release()}), "
      f"{datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC. Torus: 3 nodes, replication 2, loopback. "
      f"Workload: shared/bench/jobs.fio (each job 15 s after 2 s ramp), fio nbd engine (rbd for Ceph).\n")
print("| job | " + " | ".join(f"{s} IOPS | {s} MB/s | {s} p99 µs" for s in systems) + " |")
print("|---|" + "---|" * (3 * len(systems)))
for job in jobs:
    cells = []
    for s in systems:
        if job in data[s]:
            i, m, p = metrics(data[s][job])
            cells += [f"{i:,.0f}", f"{m:,.1f}", f"{p:,.0f}"]
        else:
            cells += ["-", "-", "-"]
    print(f"| {job} | " + " | ".join(cells) + " |")

print("\n## Ratios: Torus / baseline (IOPS)\n")
base = [s for s in systems if s != "torus"]
print("| job | " + " | ".join(f"torus / {s}" for s in base) + " |")
print("|---|" + "---|" * len(base))
for job in jobs:
    t = metrics(data["torus"][job])[0]
    cells = []
    for s in base:
        b = metrics(data[s][job])[0] if job in data[s] else 0
        cells.append(f"{t / b:.2f}" if b else "-")
    print(f"| {job} | " + " | ".join(cells) + " |")

cpu = open(f"{run}/torus-cpu.txt").read().split()
print(f"\n## Torus processes\n\nCPU seconds during the fio run (all Torus processes): {float(cpu[1]) - float(cpu[0]):.1f}\n")
print("| process | pid | peak RSS MiB |\n|---|---|---|")
total = 0
for line in open(f"{run}/torus-rss.txt"):
    name, pid, rss = line.split()
    total += int(rss)
    print(f"| {name} | {pid} | {int(rss) / 2**20:.0f} |")
print(f"| total | | {total / 2**20:.0f} |")
if "ceph-rbd" not in systems:
    print("\nCeph RBD was not measured in this run (anchor unavailable or BENCH_CEPH=0).")
