#!/usr/bin/env python3
"""runm.py [--cold] [--label L] -- CMD...: one run of CMD after `sync` (and, with --cold, a drop of the
page cache; root), with its wall time, user and system time, and peak RssAnon sampled every 2 ms.
Used for the single runs of docs/performance.md, run 8 (the benchmark is examples/bench.rs)."""
import os, sys, time, subprocess, resource
args = sys.argv[1:]
cold = False; label = ""
while args and args[0] != "--":
    if args[0] == "--cold": cold = True; args = args[1:]
    elif args[0] == "--label": label = args[1]; args = args[2:]
    else: break
if args and args[0] == "--": args = args[1:]
subprocess.run(["sync"]); 
if cold:
    open("/proc/sys/vm/drop_caches", "w").write("3\n")
time.sleep(2)
t0 = time.time()
p = subprocess.Popen(args, stdout=subprocess.DEVNULL)
peak = 0
while p.poll() is None:
    try:
        for l in open(f"/proc/{p.pid}/status"):
            if l.startswith("RssAnon:"):
                peak = max(peak, int(l.split()[1]))
    except Exception:
        pass
    time.sleep(0.002)
wall = time.time() - t0
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
load = open("/proc/loadavg").read().split()[0]
print(f"{label}\twall {wall:.3f}\tuser {ru.ru_utime:.2f}\tsys {ru.ru_stime:.2f}\tanon {peak/1024:.1f} MiB\trc {p.returncode}\tload {load}", flush=True)
