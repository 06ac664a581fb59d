"""Run outputs: metrics.jsonl (flushed every round), summary.json, W&B, and console progress.

W&B defaults to offline mode so that every run is tracked with no network and no login (upload
later with `wandb sync`); `online` is for users who have logged in, `disabled` turns it off. A
multirun puts its jobs in one W&B group, tagged with each job's overrides (set by `fleet.runtime.cli`).
When a run ends, the plots of `fleet.runtime.report` are logged as W&B media, so the W&B page and
`fleet-report` show the same figures. Nothing logged names a device.
"""

from __future__ import annotations

import io
import json
import os
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from fleet.atomic import jsonable as _jsonable
from fleet.atomic import write_json
from fleet.runtime.runs import HEADLINE

if TYPE_CHECKING:
    from fleet.config import Config


def wandb_logged_in() -> bool:
    """Whether W&B has credentials here (WANDB_API_KEY or a netrc entry for its host): checked
    before anything starts, since `tracking=online` without them fails only once W&B starts."""
    import netrc
    from urllib.parse import urlparse

    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def flatten(d: dict, sep: str = "/", prefix: str = "") -> dict:
    """A nested dict's leaves under joined keys: `dropped/failure` (W&B) or `fleet.goal`."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, sep, key + sep))
        else:
            out[key] = v
    return out


def wandb_values(d: dict) -> dict:
    """The numbers of a (nested) line as W&B keys: `dropped/failure`, `timing/plan_s`, ..."""
    return {k: v for k, v in flatten(_jsonable(d)).items() if isinstance(v, (int, float, bool))}


class Tracker:
    """Writes metrics.jsonl, mirrors each line to W&B, and keeps the progress bar."""

    def __init__(self, run_dir: Path, cfg: Config, config_dict: dict, total_rounds: int):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        t = cfg.tracking
        self.media = bool(t.media)
        self.wandb = None
        if t.mode != "disabled":
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb

            # A resumed run continues its W&B run: same id (offline, `wandb sync` of both
            # offline-run folders makes one run online).
            id_file = self.run_dir / "wandb_run_id"
            run_id = id_file.read_text().strip() if cfg.resume and id_file.exists() else None
            self.wandb = wandb.init(
                mode=t.mode,
                project=t.project,
                entity=t.entity,
                group=t.group,
                tags=list(t.tags) or None,
                dir=str(self.run_dir),
                config=config_dict,
                id=run_id,
                resume="allow" if run_id else None,
                reinit="finish_previous",
            )
            id_file.write_text(self.wandb.id)
        self.headline: dict[str, float] = {}  # last value of each headline metric, kept between evals
        self.released = self.abandoned = 0
        self.bar = tqdm(
            total=total_rounds, desc="rounds", unit="rd", disable=not cfg.progress, dynamic_ncols=True
        )
        # While the bar is up, the console's log lines (Hydra's handler on the root logger, in a
        # multirun too) go through tqdm: each on its own line above the bar, never into it.
        self._console = ExitStack()
        if cfg.progress:
            self._console.enter_context(logging_redirect_tqdm(tqdm_class=tqdm))

    def close_console(self) -> None:
        """Hand the console back to the logging handlers and take the bar down (idempotent)."""
        self._console.close()
        self.bar.close()

    def log(self, line: dict) -> None:
        self.metrics.write(json.dumps(_jsonable(line), sort_keys=True) + "\n")
        if self.wandb is not None:
            self.wandb.log(wandb_values(line), step=int(line["round"]))
        self.headline.update({k: line[k] for k in HEADLINE if line.get(k) is not None})
        post = {}
        if line.get("epsilon") is not None:
            post["eps"] = f"{line['epsilon']:.3g}"
        post.update({k: f"{v:.4g}" for k, v in self.headline.items()})
        # available > selected > reported (not under private telemetry); an abandoned round
        # released nothing
        funnel = f"{line['available']}>{line['selected']}>{line['reported']}" if "available" in line else ""
        if line.get("incident"):  # a shard died: what the round would have counted is unknown
            funnel = line["incident"].replace("_", " ")
        funnel = (funnel + (" abandoned" if line["abandoned"] else "")).strip()
        if funnel:
            post["funnel"] = funnel
        self.released += bool(line.get("released"))
        self.abandoned += bool(line.get("abandoned"))
        post["rel/ab"] = f"{self.released}/{self.abandoned}"
        if line.get("pure_noise"):
            post["note"] = "noise only"
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(1)

    def warn(self, text: str) -> None:
        """A warning on the console (above the bar), in the log, and as a W&B alert."""
        import logging

        logging.getLogger("fleet.runtime.guards").warning("%s", text)
        if self.wandb is not None:
            try:
                self.wandb.alert(title="fleet", text=text)
            except Exception:  # offline runs cannot alert; the warning is in the log either way
                pass

    def finish(self, summary: dict) -> None:
        self.close_console()
        write_json(self.run_dir / "summary.json", summary)
        self.metrics.close()
        if self.wandb is not None:
            for k, v in flatten(_jsonable(summary)).items():
                if isinstance(v, (int, float, bool, str)):
                    self.wandb.summary[k] = v
            if self.media:
                self._log_media()
            self.wandb.finish()

    def _log_media(self) -> None:
        """The report's figures, from the files just written: what `fleet-report` would draw."""
        import wandb
        from PIL import Image

        from fleet.runtime import report

        run = report.load_run(self.run_dir)
        images = {
            # as PNG: wandb.Image(figure) needs pyplot, which the report never touches
            f"plots/{name}": wandb.Image(Image.open(io.BytesIO(report.png_bytes(fig))))
            for name, fig in report.figures([run]).items()
        }
        if images:
            self.wandb.log(images, step=int(run.lines[-1]["round"]) if run.lines else 0)
