"""Live training state kept on the server per Train LoRA node, so a reloaded page can redraw the run so far."""

from __future__ import annotations

import io
import threading
import time

MAX_POINTS = 20_000  # per node; a longer run keeps every other point of its oldest half
MAX_NODES = 16


class TrainingLog:
    """The loss history, latest step info and latest preview (PNG bytes) of each node's current run."""

    def __init__(self):
        self._runs: dict[str, dict] = {}
        self._previews: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def start(self, node: str, total: int) -> None:
        with self._lock:
            if node not in self._runs and len(self._runs) >= MAX_NODES:
                oldest = min(self._runs, key=lambda k: self._runs[k]["started"])
                self._runs.pop(oldest)
                self._previews.pop(oldest, None)
            self._runs[node] = {"node": node, "total": total, "started": time.time(), "steps": [], "loss": [],
                                "validation": [], "last": None, "preview": 0, "done": False}
            self._previews.pop(node, None)

    def record(self, node: str, info: dict, preview=None) -> dict:
        """Add one step's info (and a PIL preview); returns the event to send, with `preview` = its sequence number."""
        png = _png(preview) if preview is not None else None
        with self._lock:
            run = self._runs.get(node)
            if run is None:
                return dict(info)
            run["total"] = info.get("total", run["total"])  # epochs: the steps are known once the run starts
            run["steps"].append(info["step"])
            run["loss"].append(info["loss"])
            val = info.get("validation")
            if val is not None and (not run["validation"] or run["validation"][-1][1] != val):
                run["validation"].append([info["step"], val])
            if len(run["steps"]) > MAX_POINTS:
                half = MAX_POINTS // 2
                run["steps"][:half] = run["steps"][:half:2]
                run["loss"][:half] = run["loss"][:half:2]
            if png is not None:
                self._previews[node] = png
                run["preview"] += 1
            run["last"] = {k: v for k, v in info.items() if k != "preview"}
            run["done"] = info["step"] >= run["total"] or bool(info.get("stopped_early"))
            return {**run["last"], "preview": run["preview"]}

    def state(self, node: str) -> dict | None:
        with self._lock:
            run = self._runs.get(node)
            if run is None:
                return None
            return {**run, "steps": list(run["steps"]), "loss": list(run["loss"]),
                    "validation": [list(v) for v in run["validation"]]}

    def preview(self, node: str) -> bytes | None:
        with self._lock:
            return self._previews.get(node)


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


TRAINING_LOG = TrainingLog()
