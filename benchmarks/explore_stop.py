"""How fast densevit-explore stops: seconds from Ctrl-C (SIGINT) or SIGTERM to the process's exit, idle and in the
middle of an extraction (stride 4 at load size 448 started just before the signal).

    python benchmarks/explore_stop.py [--runs 3] [--out benchmarks/results/explore_stop]

A real ``densevit-explore`` on 127.0.0.1 with the golden random weights and the shared cat and ibex photos.
Prints a table and writes ``<out>.csv`` and ``<out>.json``.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from densevit.io.paths import example_images, golden_weights


def stop_seconds(busy: bool, sig: signal.Signals, tmp: Path) -> float:
    cmd = [sys.executable, "-m", "densevit.apps.cli.explore", *map(str, example_images()), "--weights",
           str(golden_weights()), "--load-size", "56", "--port", "0", "--device", "cpu", "--out", str(tmp),
           "--quiet"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        url = re.search(r"http://(\S+)/", p.stdout.readline()).group(0).rstrip("/")
        if busy:
            body = json.dumps({"settings": {"stride": 4, "load_size": 448, "layer": 11}}).encode()
            req = urllib.request.Request(url + "/api/prepare", data=body,
                                         headers={"Content-Type": "application/json", "Origin": url})

            def post():
                try:
                    urllib.request.urlopen(req, timeout=120)
                except Exception:  # noqa: BLE001 (503: the explorer is stopping)
                    pass

            threading.Thread(target=post, daemon=True).start()
            time.sleep(1.5)
        else:
            time.sleep(0.5)
        t = time.perf_counter()
        p.send_signal(sig)
        p.wait(60)
        return time.perf_counter() - t
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/explore_stop")
    args = ap.parse_args()
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="explore_stop_"))          # Save's folder (nothing is saved)
    for busy in (False, True):
        for sig in (signal.SIGINT, signal.SIGTERM):
            secs = [stop_seconds(busy, sig, tmp) for _ in range(args.runs)]
            rows.append({"state": "mid-extraction" if busy else "idle", "signal": sig.name,
                         "median_s": round(sorted(secs)[len(secs) // 2], 3), "max_s": round(max(secs), 3)})
    print(f"{'state':16s} {'signal':8s} {'median s':>9s} {'max s':>7s}")
    for r in rows:
        print(f"{r['state']:16s} {r['signal']:8s} {r['median_s']:9.2f} {r['max_s']:7.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    out.with_suffix(".json").write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                                                    "cpus": os.cpu_count(), "runs": args.runs, "rows": rows},
                                                   indent=1) + "\n")


if __name__ == "__main__":
    main()
