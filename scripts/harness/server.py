"""A real ComfyUI server with this pack loaded: start, queue workflows, wait, stop."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from .comfy import REPO_ROOT, allowed_roots_env, comfy_root

PACK_DIR_NAME = "lora_foundry"


def frontends() -> dict[str, Path | None]:
    """The ComfyUI frontends a server can serve, by version: the pinned package (None: the server's default) and each
    newer one scripts/setup.sh put in .venv/frontends/<version>/ (its static folder, for --front-end-root)."""
    from importlib.metadata import version

    found: dict[str, Path | None] = {version("comfyui_frontend_package"): None}
    for static in sorted(Path(sys.prefix, "frontends").glob("*/comfyui_frontend_package/static")):
        found[static.parents[1].name] = static
    return found


class WorkflowError(RuntimeError):
    """A prompt the server refused or a node that failed while executing."""

    def __init__(self, message: str, node_id: str | None = None, node_type: str | None = None, details=None):
        where = f"node {node_id} ({node_type}): " if node_id else ""
        super().__init__(where + message)
        self.node_id = node_id
        self.node_type = node_type
        self.details = details


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _link_or_copy(src: Path, dst: Path) -> None:
    if dst.is_symlink() or dst.exists():
        if dst.is_symlink() and dst.resolve() == src.resolve():
            return
        if dst.is_dir() and not dst.is_symlink():
            shutil.rmtree(dst)
        else:
            dst.unlink()
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.symlink_to(src.resolve(), target_is_directory=src.is_dir())


class ComfyServer:
    """A ComfyUI server process on 127.0.0.1 with its own base directory.

    `models` maps a models sub-folder ("checkpoints", "loras", ...) to files to link into it; `test_models` adds
    the test-only node that builds the harness's tiny families (harness/test_models).
    Use as a context manager; the process is stopped on exit, also when a test fails.
    """

    def __init__(
        self,
        base_dir: Path,
        models: dict[str, list[Path]] | None = None,
        port: int | None = None,
        extra_args: list[str] | None = None,
        cpu: bool | None = None,
        test_models: bool = False,
    ):
        self.base_dir = Path(base_dir).resolve()
        self.models = models or {}
        self.port = port or free_port()
        self.extra_args = extra_args or []
        self.cpu = cpu
        self.test_models = test_models  # the test-only tiny-family node (harness/test_models)
        self.process: subprocess.Popen | None = None
        self.log_path = self.base_dir / "server.log"
        self.client_id = uuid.uuid4().hex

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def prepare(self) -> None:
        for sub in ("custom_nodes", "input", "output", "temp", "user/default"):
            (self.base_dir / sub).mkdir(parents=True, exist_ok=True)
        _link_or_copy(REPO_ROOT, self.base_dir / "custom_nodes" / PACK_DIR_NAME)
        if self.test_models:
            _link_or_copy(Path(__file__).parent / "test_models", self.base_dir / "custom_nodes" / "lora_foundry_test_models")
        for folder, files in self.models.items():
            for f in files:
                _link_or_copy(Path(f), self.base_dir / "models" / folder / Path(f).name)
        settings = self.base_dir / "user" / "default" / "comfy.settings.json"
        if not settings.exists():
            settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}))

    def start(self, timeout: float = 120.0) -> ComfyServer:
        self.prepare()
        if self.cpu is None:
            from .comfy import has_cuda

            self.cpu = not has_cuda()
        root = comfy_root()
        cmd = [
            sys.executable, str(root / "main.py"),
            "--listen", "127.0.0.1", "--port", str(self.port),
            "--disable-auto-launch",
            "--base-directory", str(self.base_dir),
            "--database-url", f"sqlite:///{self.base_dir / 'user' / 'comfyui.db'}",
        ]
        if self.cpu:
            cmd.append("--cpu")
        cmd += self.extra_args
        env = dict(os.environ, PYTHONUNBUFFERED="1", **allowed_roots_env())
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            cmd, cwd=str(root), stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode} during startup; log:\n{self.log_tail()}")
            try:
                self.get("/system_stats", timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer within {timeout:.0f}s; log:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=15)
        self._log.close()
        self.process = None

    def __enter__(self) -> ComfyServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, chars: int = 4000) -> str:
        return self.log()[-chars:]

    # --- HTTP ---------------------------------------------------------------------------

    def request(self, method: str, path: str, body=None, timeout: float = 30):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def get(self, path: str, timeout: float = 30):
        return self.request("GET", path, timeout=timeout)

    def post(self, path: str, body, timeout: float = 30):
        return self.request("POST", path, body, timeout=timeout)

    def object_info(self) -> dict:
        return self.get("/object_info", timeout=60)

    # --- workflows ------------------------------------------------------------------------

    def queue(self, workflow: dict) -> str:
        """Queue a workflow (API format, or UI format with "nodes"/"links"); returns the prompt id."""
        from .workflow import to_api_prompt

        prompt = to_api_prompt(workflow, self.object_info()) if "nodes" in workflow else workflow
        try:
            answer = self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})
        except urllib.error.HTTPError as e:
            details = json.loads(e.read() or b"{}")
            node_errors = details.get("node_errors") or {}
            for node_id, err in node_errors.items():
                msgs = "; ".join(f"{x.get('message')}: {x.get('details')}" for x in err.get("errors", []))
                raise WorkflowError(msgs, node_id, err.get("class_type"), details) from None
            raise WorkflowError(str(details.get("error", details)), details=details) from None
        return answer["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600) -> dict:
        """Wait for a queued prompt; returns {node_id: outputs}; raises WorkflowError on failure."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running the prompt; log:\n{self.log_tail()}")
            history = self.get(f"/history/{prompt_id}")
            entry = history.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                status = entry["status"]
                if status.get("status_str") == "error":
                    for kind, msg in status.get("messages", []):
                        if kind == "execution_error":
                            raise WorkflowError(
                                f"{msg.get('exception_type')}: {msg.get('exception_message')}",
                                str(msg.get("node_id")), msg.get("node_type"), msg,
                            )
                    raise WorkflowError(f"prompt failed: {status}")
                if status.get("completed"):
                    return entry.get("outputs", {})
            time.sleep(0.2)
        self.post("/interrupt", {})
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f}s")

    def run(self, workflow: dict, timeout: float = 600) -> dict:
        """Queue a workflow and wait for its outputs."""
        return self.wait(self.queue(workflow), timeout)

    def output_files(self, outputs: dict) -> list[Path]:
        """Paths of the images/files that UI outputs name (as SaveImage reports them)."""
        paths = []
        for node_out in outputs.values():
            for items in node_out.values():
                for item in items if isinstance(items, list) else []:
                    if isinstance(item, dict) and "filename" in item:
                        folder = self.base_dir / item.get("type", "output")
                        paths.append(folder / item.get("subfolder", "") / item["filename"])
        return paths
