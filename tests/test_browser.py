"""The front end in a real browser: Debian's headless Chromium, driven by Playwright, on ComfyUI's own
frontend served by the harness server with the pack loaded. Screenshots go to the test artifacts."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import urllib.error
import urllib.parse

import pytest
from conftest import ARTIFACTS
from harness.comfy import REPO_ROOT
from harness.examples import make_fast, needed_files, provide, set_widget
from harness.server import ComfyServer

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
TRAIN_STEPS = 6

if os.environ.get("CI") and CHROMIUM is None:  # CI must run these, never skip them
    raise RuntimeError("no chromium on the CI machine: `bash scripts/setup.sh` installs Debian's package")
pytestmark = [
    pytest.mark.server, pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium: `bash scripts/setup.sh` installs Debian's package"),
]
import playwright.sync_api as sync_api  # noqa: E402  (pinned in requirements/dev.lock)


def example(name: str) -> dict:
    return json.loads((REPO_ROOT / "example_workflows" / name).read_text())


@pytest.fixture(scope="module")
def ui_server(tmp_path_factory, pack, loaded_checkpoint, tiny_checkpoint, concept_dataset):
    """A server with the files the training and stack examples name."""
    with ComfyServer(tmp_path_factory.mktemp("browser")) as server:
        info = server.object_info()
        for name in ("train_lora_before_after.json", "stack_loras.json"):
            provide(server, needed_files(example(name), info), pack, loaded_checkpoint, tiny_checkpoint,
                    concept_dataset)
        server.info = info
        yield server


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        instance = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield instance
        instance.close()


class Page:
    """A ComfyUI tab; remembers console errors that come from our scripts."""

    def __init__(self, browser, server):
        self.server = server
        self.page = browser.new_page(viewport={"width": 1500, "height": 1000})
        self.errors: list[str] = []
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda e: self._error(f"{e}\n{e.stack or ''}"))

    def _console(self, message) -> None:
        if message.type == "error":
            self._error(f"{message.text} @ {message.location.get('url', '')}")

    def _error(self, text: str) -> None:
        # Ours: raised in our scripts, or a failed request to our routes. (The frontend's own lookups of
        # node names on its online registry fail here too: there is no network.)
        if "/extensions/lora_foundry/" in text or f"{self.server.url}/api/lora_foundry/" in text:
            self.errors.append(text)

    def open(self) -> Page:
        self.page.goto(self.server.url)
        self.wait_ready()
        return self

    def wait_ready(self) -> None:
        self.page.wait_for_function("() => window.app?.graph && window.app.extensionManager", timeout=120_000)
        self.page.wait_for_function(
            "() => app.extensions?.some(e => e.name === 'LoraFoundry.TrainView')", timeout=60_000)

    def eval(self, script: str, arg=None):
        return self.page.evaluate(script, arg)

    def load(self, workflow: dict) -> None:
        self.eval("async wf => { await app.loadGraphData(wf); }", workflow)

    def focus(self, node_id: int, scale: float = 1.0, below: float = 0) -> None:
        """Put a node (from `below` its top) at the top left of the canvas at `scale`."""
        self.eval("""([id, scale, below]) => { const n = app.graph.getNodeById(id); const ds = app.canvas.ds;
            ds.scale = scale; ds.offset = [-n.pos[0] + 80, -n.pos[1] - below + 60]; app.canvas.setDirty(true, true); }""",
                  [node_id, scale, below])
        time.sleep(0.5)

    def queue(self) -> None:
        self.eval("async () => { await app.queuePrompt(0, 1); }")

    def shot(self, name: str) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / f"browser-{name}.png"))

    def wait_for(self, script: str, timeout: float = 600, arg=None):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.eval(script, arg)
            if value:
                return value
            time.sleep(0.5)
        raise TimeoutError(f"{script} stayed false for {timeout:.0f}s; server log:\n{self.server.log_tail()}")


def train_state(page: Page, node_id: int) -> dict:
    return page.eval("""id => { const v = app.graph.getNodeById(id)?.widgets?.find(w => w.name === 'live_training')?.view;
        if (!v) return null; const s = v.state; const c = v.canvas; let inked = 0;
        if (c.width) { const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
          for (let i = 0; i < d.length; i += 4) if (d[i + 2] > 200 && d[i] < 120) inked++; }
        return { step: s.step, total: s.total, losses: s.loss.length, validation: s.validation.length,
                 preview: s.preview, status: s.status, stats: v.stats.textContent, draws: v.draws, inked,
                 image: v.image.complete ? v.image.naturalWidth : 0 }; }""", node_id)


def history(server: ComfyServer) -> dict:
    return server.get("/history")


def finished(server: ComfyServer, count: int) -> list[dict]:
    """Completed prompts once there are `count` of them (raising on a failed one)."""
    entries = list(history(server).values())
    for entry in entries:
        if entry.get("status", {}).get("status_str") == "error":
            raise AssertionError(f"prompt failed: {entry['status']}")
    done = [e for e in entries if e.get("status", {}).get("completed")]
    return done if len(done) >= count else []


def test_training_view_updates_live_survives_a_reload_and_finishes(browser, ui_server):
    info = ui_server.info
    workflow = make_fast(example("train_lora_before_after.json"), info)
    train = next(n for n in workflow["nodes"] if n["type"] == "LoraFoundryTrainLoRA")
    for name, value in (("steps", TRAIN_STEPS), ("sample_every", 3), ("validation_every", 3)):
        set_widget(train, info["LoraFoundryTrainLoRA"], name, value)
    train["pos"] = [2000, 0]  # clear of the example's other nodes, for the screenshots
    page = Page(browser, ui_server).open()
    page.load(workflow)
    page.focus(train["id"], 0.9, below=600)
    page.queue()
    running = page.wait_for(f"() => (app.graph.getNodeById({train['id']})?.widgets?.find(w => w.name === "
                            f"'live_training')?.view.state.step ?? 0) >= 2")
    assert running
    before = train_state(page, train["id"])
    assert before["status"] == "running" and before["losses"] >= 2 and before["inked"] > 0, before
    page.shot("train-running")

    page.page.reload()  # the workflow comes back from the browser's storage; the chart from the server
    page.wait_ready()
    page.focus(train["id"], 0.9, below=600)
    restored = page.wait_for(f"() => (app.graph.getNodeById({train['id']})?.widgets?.find(w => w.name === "
                             f"'live_training')?.view.state.loss.length ?? 0) >= {before['losses']}", timeout=60)
    assert restored
    page.shot("train-reloaded")

    deadline = time.monotonic() + 900
    while not finished(ui_server, 1) and time.monotonic() < deadline:
        time.sleep(1)
    assert finished(ui_server, 1), ui_server.log_tail()
    page.wait_for(f"() => app.graph.getNodeById({train['id']}).widgets.find(w => w.name === 'live_training')"
                  ".view.state.status === 'finished'", timeout=60)
    page.wait_for(f"() => app.graph.getNodeById({train['id']}).widgets.find(w => w.name === 'live_training')"
                  ".view.image.naturalWidth > 0", timeout=60)
    state = train_state(page, train["id"])
    assert state["step"] == TRAIN_STEPS and state["losses"] == TRAIN_STEPS, state
    assert state["validation"] >= 1 and state["preview"] >= 2 and state["image"] > 0, state
    assert state["inked"] > 0 and f"step {TRAIN_STEPS}/{TRAIN_STEPS}" in state["stats"], state
    assert re.search(r"est\. \d+\.\d\d GB", state["stats"]), state  # the run's planned peak memory
    page.shot("train-finished")
    assert not page.errors, page.errors


def test_stack_widget_rows_and_typed_strength_reach_the_server(browser, ui_server):
    page = Page(browser, ui_server).open()
    workflow = make_fast(example("stack_loras.json"), ui_server.info)
    apply = next(n for n in workflow["nodes"] if n["type"] == "LoraFoundryApplyLoraStack")
    set_widget(apply, ui_server.info["LoraFoundryApplyLoraStack"], "loras", "[]")
    page.load(workflow)
    page.focus(apply["id"], 1.2)
    stack = page.page.locator(".lf-stack").filter(has=page.page.locator(".lf-add")).nth(1)
    names = page.eval("async () => (await (await fetch('/models/loras')).json())")
    assert len(names) >= 2, names
    stack.locator(".lf-add").click()
    stack.locator(".lf-add").click()
    rows = stack.locator(".lf-row:not(.lf-head)")
    assert rows.count() == 2
    rows.nth(0).locator("select").select_option(names[1])
    rows.nth(1).locator("select").select_option(names[0])
    rows.nth(1).locator(".lf-model").click()  # click: type an exact value
    page.page.keyboard.type("0.35")
    page.page.keyboard.press("Enter")
    box = rows.nth(0).locator(".lf-clip").bounding_box()  # drag: +40 px = +0.4
    page.page.mouse.move(box["x"] + 10, box["y"] + box["height"] / 2)
    page.page.mouse.down()
    page.page.mouse.move(box["x"] + 50, box["y"] + box["height"] / 2, steps=8)
    page.page.mouse.up()
    page.shot("stack-edited")

    value = json.loads(page.eval(f"() => app.graph.getNodeById({apply['id']}).widgets.find(w => w.name === 'loras').value"))
    assert [r["lora"] for r in value] == [names[1], names[0]]
    assert value[1]["strength_model"] == 0.35 and value[0]["strength_clip"] == pytest.approx(1.4, abs=0.02)

    before = len(history(ui_server))
    page.queue()
    deadline = time.monotonic() + 600
    while len(finished(ui_server, before + 1)) < before + 1 and time.monotonic() < deadline:
        time.sleep(1)
    entry = max(finished(ui_server, before + 1), key=lambda e: e["prompt"][0])
    sent = json.loads(entry["prompt"][2][str(apply["id"])]["inputs"]["loras"])
    assert sent == value, sent
    report = "\n".join(str(t) for out in entry["outputs"].values() for t in out.get("text", []))
    assert all(name.rsplit(".", 1)[0] in report for name in names[:2]), report

    # The LoRA info panel of a row reads the file's header through our route.
    rows.nth(1).locator(".lf-tool[title='LoRA info']").click()
    page.page.locator(".lf-info-panel h3").wait_for()
    panel = page.page.locator(".lf-info-panel").inner_text()
    assert "sd_v1" in panel and "rank" in panel, panel
    page.shot("stack-info")
    assert not page.errors, page.errors


def test_lora_info_route_reads_headers_only_inside_the_loras_folders(ui_server):
    names = ui_server.get("/models/loras")
    info = ui_server.get("/lora_foundry/lora_info?name=" + urllib.parse.quote(names[0]))
    assert info["rank"] == 8 and info["algorithm"] == "lora" and info["base_model"] == "sd_v1", info
    assert info["modules"] > 0 and info["text_encoder"] is True
    (ui_server.base_dir / "secret.safetensors").write_bytes(b"x")
    for bad in ("../secret.safetensors", "/etc/passwd", "missing.safetensors", names[0].replace(".safetensors", ".ckpt")):
        with pytest.raises(urllib.error.HTTPError) as err:
            ui_server.get("/lora_foundry/lora_info?name=" + urllib.parse.quote(bad))
        assert err.value.code in (400, 404), bad
    assert ui_server.get("/lora_foundry/train_state?node=12345") is None
