"""Run outputs: metrics.jsonl (flushed every round), summary.json, W&B, and console progress.

W&B defaults to offline mode so that every run is tracked with no network and no login; `online`
is for users who have logged in, `disabled` turns it off. Nothing logged names a device.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from tqdm import tqdm


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "item") and callable(x.item):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else (1e308 if x > 0 else -1e308)
    return x


def write_json(path: Path, obj: Any) -> None:
    """Atomic write: a crash leaves the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_jsonable(obj), indent=2, sort_keys=True))
    os.replace(tmp, path)


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "/"))
        else:
            out[key] = v
    return out


class Tracker:
    """Writes metrics.jsonl and mirrors each line to W&B (offline unless configured)."""

    def __init__(self, run_dir: Path, cfg: Any, config_dict: dict, total_rounds: int):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        self.wandb = None
        t = cfg.tracking
        if t.mode != "disabled":
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb

            self.wandb = wandb.init(
                mode=t.mode,
                project=t.project,
                group=t.group,
                tags=list(t.tags) or None,
                dir=str(self.run_dir),
                config=config_dict,
                reinit="finish_previous",
            )
        self.bar = tqdm(total=total_rounds, desc="rounds", unit="rd", disable=not cfg.progress, dynamic_ncols=True)

    def log(self, line: dict) -> None:
        self.metrics.write(json.dumps(_jsonable(line), sort_keys=True) + "\n")
        if self.wandb is not None:
            flat = {k: v for k, v in flatten(_jsonable(line)).items() if isinstance(v, (int, float, bool))}
            self.wandb.log(flat, step=int(line["round"]))
        post = {"avail": line["available"], "rep": f"{line['reported']}/{line['selected']}"}
        if line.get("epsilon") is not None:
            post["eps"] = f"{line['epsilon']:.3g}"
        for k in ("recall@1", "eval_distance"):
            if k in line:
                post[k] = f"{line[k]:.4g}"
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(1)

    def finish(self, summary: dict) -> None:
        self.bar.close()
        write_json(self.run_dir / "summary.json", summary)
        if self.wandb is not None:
            for k, v in flatten(_jsonable(summary)).items():
                if isinstance(v, (int, float, bool, str)):
                    self.wandb.summary[k] = v
            self.wandb.finish()
        self.metrics.close()
