#!/usr/bin/env python3
"""CPU seconds (utime+stime) summed over PIDs, or peak RSS (VmHWM) per PID, from /proc."""
import os, sys

def cpu(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

def hwm(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0

def name(pid):
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()

mode, pids = sys.argv[1], sys.argv[2:]
if mode == "cpu":
    print(f"{sum(cpu(p) for p in pids):.2f}")
else:
    for p in pids:
        print(name(p), p, hwm(p))
