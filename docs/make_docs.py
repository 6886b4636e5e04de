"""The README's images from a real run: the real loop, the tiny real trainer (with progress lines),
scripted edits (gains, losses, noise, and three kinds of crash). Usage: make_docs.py WORKDIR DOCS_DIR"""
import shutil, sys, threading, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from autoresearch.harness import PROFILES, prepare
from autoresearch.harness.sources import default_source
from autoresearch.lab.loop import Lab
from autoresearch.proposers.scripted import ScriptedProposer
from lab_helpers import make_workspace
from report_helpers import PROGRESS_TRAINER, set_budget, start_trial, running_trial_with_progress

EDITS = [
    {"description": "LR 0.003 -> 0.01", "replace": [["LR = 0.003", "LR = 0.01"]]},
    {"description": "DIM 32 -> 64", "replace": [["DIM = 32", "DIM = 64"]]},
    {"description": "peek at the next token", "replace": [["features = self.embed(idx)  # FEATURES",
        "features = self.embed(idx) + self.embed(idx.roll(-1, dims=1))  # FEATURES"]]},
    {"description": "BATCH 16 -> 32", "replace": [["BATCH = 16", "BATCH = 32"]]},
    {"description": "AdamW, weight decay 0.1", "replace": [["torch.optim.Adam(model.parameters(), lr=LR)",
        "torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)"]]},
    {"description": "train 3x past the budget", "replace": [["run.time_budget:  # BUDGET", "3 * run.time_budget:  # BUDGET"]]},
    {"description": "LR 0.01 -> 0.03", "replace": [["LR = 0.01", "LR = 0.03"]]},
    {"description": "ReLU on the embeddings", "replace": [["features = self.embed(idx)  # FEATURES",
        "features = torch.relu(self.embed(idx))  # FEATURES"]]},
    {"description": "typo in optimizer.step", "replace": [["optimizer.step()", "optimiser.step()"]]},
    {"description": "LR 0.03 -> 0.1", "replace": [["LR = 0.03", "LR = 0.1"]]},
    {"description": "BATCH 16 -> 8", "replace": [["BATCH = 16", "BATCH = 8"]]},
]

work, docs = Path(sys.argv[1]), Path(sys.argv[2])
data, _ = prepare(default_source(), PROFILES["cpu"], progress=False)
shutil.rmtree(work, ignore_errors=True)
ws = make_workspace(work / "ws", data, PROGRESS_TRAINER, budget=3.0, baseline_runs=3)
lab = Lab(ws, log=lambda m: print(time.strftime("%H:%M:%S"), m, flush=True))
try:
    lab.run(ScriptedProposer(EDITS))
finally:
    lab.close()

from autoresearch.report import make_report, make_server
result = make_report(ws.root, work / "report")
print(result.markdown)
docs.mkdir(parents=True, exist_ok=True)
shutil.copyfile(result.files["progress.png"], docs / "progress.png")

# the dashboard while one more trial runs
set_budget(ws.root, 8.0)
server = make_server(ws.root, port=0)
threading.Thread(target=server.serve_forever, daemon=True).start()
from playwright.sync_api import sync_playwright
with sync_playwright() as p:
    browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--headless", "--no-sandbox", "--disable-gpu",
        "--disable-background-networking", "--disable-component-update", "--no-first-run"])
    page = browser.new_page(viewport={"width": 1280, "height": 1280}, device_scale_factor=1)
    page.goto(server.url)
    import re
    dim = int(re.search(r"^DIM = (\d+)", (ws.root / "train.py").read_text(), re.M).group(1))
    proc = start_trial(ws.root, f"DIM = {dim}", f"DIM = {dim * 3 // 2}", f"DIM {dim} -> {dim * 3 // 2}")
    deadline = time.time() + 120
    while not running_trial_with_progress(ws.root):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.1)
    time.sleep(5.0)
    page.screenshot(path=str(docs / "dashboard.png"), full_page=False)
    proc.communicate()
    browser.close()
server.shutdown()
