"""`python -m fleet.bench plan`: how long `fleet-plan` takes, at the Gboard scale and at 1e5 phones.

Runs `fleet-plan` as a user would (a separate process, Ray started and stopped by it) on
`experiment=gboard_es` (10 million phones in Spain's time zones, 2,000 rounds, 6,500 reports a
round) with a target epsilon for the p99 device, and on the default fleet (1e5 phones, 100 rounds),
in one run. It prints each plan's wall time, its rounds per second, the time the plan's own
analysis took after the rounds (per-device epsilon from the availability patterns, calibration),
and the ratio of the two scales. Targets: the 10M x 2,000-round plan within 10 minutes on the
2-core machine; the 1e5 plan in seconds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = {
    "gboard_es": ["experiment=gboard_es", "--target-epsilon", "8", "--for", "p99"],
    "default": ["--target-epsilon", "1", "--for", "p99"],
}


def plan_once(args: list[str], out: Path) -> dict:
    cmd = [sys.executable, "-m", "fleet.runtime.plan_cli", *args, "tracking=disabled", "progress=false"]
    t0 = time.perf_counter()
    p = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"fleet-plan failed ({p.returncode}):\n{p.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rounds_s = sum(x.get("wall_s", 0.0) for x in lines)
    plan = json.loads((out / "plan" / "plan.json").read_text())
    return {
        "wall_s": wall,
        "rounds": len(lines),
        "population": plan["population"],
        "rounds_s": rounds_s,
        "rounds_per_s": len(lines) / rounds_s if rounds_s else None,
        "run_s": summary.get("wall_s"),
        "headline": plan["privacy"]["headline"]["epsilon"],
        "p99": plan["privacy"]["per_device"].get("p99"),
        "z": plan.get("calibration", {}).get("noise_multiplier"),
        "stdout": p.stdout.strip().splitlines()[-6:],
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m fleet.bench plan", description=__doc__.split("\n")[0])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    args = ap.parse_args(argv)
    got = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.cases:
            got[name] = r = plan_once(CASES[name], Path(tmp) / name)
            print(
                f"{name}: {r['population']:,} phones x {r['rounds']} rounds: {r['wall_s']:.1f} s wall "
                f"({r['rounds_per_s']:.1f} rounds/s in the rounds, {r['rounds_s']:.1f} s); headline epsilon "
                f"{r['headline']:.4g}, p99 device {r['p99']:.4g}; z for the target {r['z']:.4g}"
            )
            for line in r["stdout"]:
                print(f"    {line}")
    if len(got) == 2:
        a, b = got["gboard_es"], got["default"]
        print(
            f"ratio: {a['wall_s'] / b['wall_s']:.1f}x the wall time for "
            f"{a['population'] * a['rounds'] / (b['population'] * b['rounds']):.0f}x the phone-rounds"
        )
    if "gboard_es" in got:
        ok = got["gboard_es"]["wall_s"] <= 600
        print(f"target: the 10M x 2,000-round plan within 10 minutes: {'met' if ok else 'MISSED'}")


if __name__ == "__main__":
    main()
