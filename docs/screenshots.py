"""Screenshots of the MLflow UI as a newcomer sees it after the quickstart: `kdci-ray ui` against a store,
headless Chromium (Debian's /usr/bin/chromium, or --browser) driven by Playwright, three pages:

  docs/img/mlflow-experiment.png   the experiment's landing page (its training runs, the quickstart's run expanded)
  docs/img/mlflow-parent-run.png   the quickstart's parent run (description, child runs, summary table)
  docs/img/mlflow-kdci-metrics.png the KDCI distillation run's per-epoch charts

    pip install playwright && apt-get install chromium    # (no browser download: Debian's Chromium is used)
    python docs/screenshots.py --tracking-uri sqlite:///runs/mlflow/mlflow.db
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Chromium on a machine without outside network: no background connections, no sandbox when run as root.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, server: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"kdci-ray ui exited with {server.returncode}")
        try:
            urllib.request.urlopen(url, timeout=5)
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"{url} did not answer in {timeout:.0f} s")


def shoot(page, url: str, out: Path, settle: float, wait_text: str | None = None, expand: str | None = None,
          height: int = 900) -> None:
    page.set_viewport_size({"width": 1440, "height": height})
    page.goto(url, wait_until="load", timeout=120_000)
    if wait_text:
        page.get_by_text(wait_text).first.wait_for(timeout=120_000)
    time.sleep(settle)  # charts and tables render after their data arrives
    close = page.get_by_role("button", name="Close")  # MLflow's assistant panel opens by default: it hides half the page
    if close.count():
        close.first.click()
        time.sleep(1)
    more = page.get_by_text("Show more", exact=True)  # a run's description, whole (it holds the summary table)
    if more.count():
        more.first.click()
        time.sleep(1)
    if expand:  # the parent run's child runs, unfolded
        toggle = page.locator("[role=row]", has_text=expand).locator("button")  # its first button is the +/- toggle
        if toggle.count():
            toggle.first.click()
            time.sleep(2)
    page.screenshot(path=str(out))
    print(f"wrote {out} ({out.stat().st_size // 1024} KiB) from {url}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tracking-uri", required=True, help="the MLflow store the quickstart wrote")
    p.add_argument("--experiment", default="kdci-quickstart")
    p.add_argument("--out", default=str(REPO / "docs" / "img"))
    p.add_argument("--browser", default="/usr/bin/chromium")
    p.add_argument("--settle", type=float, default=8.0, help="seconds a page gets to draw after loading")
    args = p.parse_args(argv)

    from playwright.sync_api import sync_playwright

    from kdci_ray.tracking.store import UI_VIEW, client

    mlflow = client(args.tracking_uri)
    experiment = mlflow.get_experiment_by_name(args.experiment)
    if experiment is None:
        raise SystemExit(f"no experiment {args.experiment!r} in {args.tracking_uri}: run `kdci-ray quickstart` first")
    runs = mlflow.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])
    parent = next((r for r in runs if "kdci.quickstart" in r.data.tags), None)
    kdci = next((r for r in runs if r.info.run_name.endswith("-kdci") and parent is not None
                 and r.data.tags.get("mlflow.parentRunId") == parent.info.run_id), None)
    if parent is None or kdci is None:
        raise SystemExit(f"{args.experiment} holds no finished quickstart (a parent run and its KDCI child)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "kdci_ray.cli", "ui", "--tracking-uri", args.tracking_uri, "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                              env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    try:
        wait_for(base, server)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.browser, args=CHROMIUM_ARGS)
            page = browser.new_page()
            exp = f"{base}/#/experiments/{experiment.experiment_id}"
            shoot(page, f"{exp}?{UI_VIEW}", out / "mlflow-experiment.png", args.settle, parent.info.run_name, expand=parent.info.run_name)
            shoot(page, f"{exp}/runs/{parent.info.run_id}?{UI_VIEW}", out / "mlflow-parent-run.png", args.settle, "Description",
                  height=1400)
            shoot(page, f"{exp}/runs/{kdci.info.run_id}/model-metrics?{UI_VIEW}", out / "mlflow-kdci-metrics.png", args.settle, "attention_entropy")
            browser.close()
    finally:  # the UI's server and its workers (its own session): Ctrl-C, then for good
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
