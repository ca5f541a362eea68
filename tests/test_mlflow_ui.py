"""The real MLflow UI, started by `azdistill ui` on a local store holding two retrains, read in headless Chromium.

Checks what a person reviewing runs sees, starting from the bare address as a user would: the runs table (not
MLflow 3's GenAI pages) with both retrains told apart by name, a retrain's page with the decision and the headline
figures without opening Artifacts, its HTML report in the artifact viewer, the retrains side by side in MLflow's
compare view with the report plot of each as an image, and the registered student whose newer version holds the
`champion` alias. Screenshots of each page are kept under tests/artifacts/ (or
$AZDISTILL_TEST_ARTIFACTS) and their paths printed.

Needs Debian's `chromium` (`make test` installs it when run as root with apt) and the `playwright` package
(a dev dependency), which drives that browser: no browser is downloaded. Without them the test is skipped,
except under CI, where it fails.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from azdistill.config.sections import PROJECT_ROOT

pytestmark = pytest.mark.slow  # a real MLflow server and a real browser: `make check` leaves them to `make test`

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("AZDISTILL_TEST_ARTIFACTS", PROJECT_ROOT / "tests" / "artifacts"))
START_TIMEOUT_S = 60


def require_browser() -> None:
    missing = []
    if not Path(CHROMIUM).is_file():
        missing.append("Debian's chromium (apt-get install chromium)")
    try:
        import playwright  # noqa: F401
    except ImportError:
        missing.append("the playwright package (pip install -e '.[dev]')")
    if missing:
        reason = " and ".join(missing) + " not installed; `make test` installs them when run as root with apt"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the MLflow UI browser test: {reason}")
        pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_group(process: subprocess.Popen) -> None:
    """Stop the UI and everything it started (uvicorn workers): SIGTERM to the group, SIGKILL after a grace."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, 0)  # anyone left in the group?
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=10)


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """Two retrains (the second beats the first and takes the champion alias), served by `azdistill ui`."""
    require_browser()
    from retrains import record_retrain

    workdir = tmp_path_factory.mktemp("ui")
    first_run, first, _ = record_retrain(workdir, "1", agreement=0.72, accuracy=0.84)
    second_run, second, _ = record_retrain(workdir, "2", agreement=0.86, accuracy=0.87)
    assert first.promoted and second.promoted
    config = workdir / "distill.yaml"
    config.write_text(
        "name: sentiment\ntask: {type: nli, labels: [positive, negative]}\n"
        "data: {train: train.jsonl, validation: validation.jsonl, test: test.jsonl}\n"
        f"tracking: {{uri: 'sqlite:///{workdir}/mlflow.db'}}\n"
    )
    port = free_port()
    log_path = workdir / "ui.log"
    # PYTHONPATH: the same azdistill as this test imports, whichever checkout the environment was installed from.
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))}
    azdistill = [sys.executable, "-c", "import sys; from azdistill.cli import main; main(sys.argv[1:])"]
    with open(log_path, "w") as log:
        # Its own process group (session), so stopping it stops the MLflow server and its workers too.
        process = subprocess.Popen([*azdistill, "ui", str(config), "--port", str(port)], stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True, env=env)
    address = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                with urllib.request.urlopen(f"{address}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the MLflow UI did not answer on {address}/health:\n{log_path.read_text()}")
            time.sleep(0.3)
        yield {"address": address, "printed": log_path.read_text(), "runs": (first_run, second_run)}
    finally:
        stop_group(process)


def screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"mlflow-ui-{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


def values_beside(name_cell) -> list[str]:
    """The texts of the grid cells to the right of `name_cell` on the same line, as a person reads the row.

    MLflow's compare view draws its metric table as two virtualised grids (names, then one column per run)
    whose cells line up by position only.
    """
    return name_cell.evaluate(
        """name => {
            const box = name.getBoundingClientRect(), middle = box.top + box.height / 2;
            return [...document.querySelectorAll('[role=grid] [role=rowgroup] > div')]
                .map(cell => [cell, cell.getBoundingClientRect()])
                .filter(([cell, r]) => r.top <= middle && middle <= r.bottom && r.left >= box.right)
                .sort((a, b) => a[1].left - b[1].left)
                .map(([cell]) => cell.innerText.trim());
        }"""
    )


def test_the_mlflow_ui_shows_both_retrains_their_metrics_and_the_champion(ui):
    from playwright.sync_api import expect, sync_playwright

    from azdistill.tracking.runs import RunSummary, ui_compare_url

    address = ui["address"]
    # `azdistill ui` prints its address and the pages of this config's runs and model.
    printed = re.findall(r"http://127\.0\.0\.1:\d+\S*", ui["printed"])
    experiment_url, model_url = printed[1], printed[2]
    assert printed[0] == address
    assert re.fullmatch(rf"{address}/#/experiments/\d+\?workflowType=machine_learning", experiment_url)
    assert model_url == f"{address}/#/models/sentiment-student"
    experiment_id = re.search(r"experiments/(\d+)", experiment_url).group(1)
    first_run, second_run = ui["runs"]

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 900})
            page.set_default_timeout(20_000)
            # Keep MLflow's assistant side panel shut: it covers a third of every screenshot.
            page.add_init_script(
                "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
                "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');"
            )

            # As a reviewer would: the bare address, then a click on the experiment. It opens the runs table (the
            # model-training view, not MLflow 3's GenAI pages), where the two retrains are told apart by name.
            page.goto(address)
            page.get_by_role("link", name="sentiment", exact=True).first.click()
            expect(page).to_have_url(re.compile(rf"#/experiments/{experiment_id}/runs\?workflowType=machine_learning"))
            first_name, second_name = (f"data-v{version} #{run_id[:6]} sentiment" for version, run_id in (("1", first_run), ("2", second_run)))
            expect(page.get_by_role("link", name=first_name, exact=True)).to_be_visible()
            expect(page.get_by_role("link", name=second_name, exact=True)).to_be_visible()
            screenshot(page, "experiment")

            # The retrain's own page, without opening Artifacts: the decision first in its description, and the
            # headline figures (agreement, the latency ratio) as named, rounded metrics.
            page.get_by_role("link", name=second_name, exact=True).click()
            expect(page.get_by_role("heading", name=second_name)).to_be_visible()
            expect(page.get_by_text("Decision: champion.", exact=True)).to_be_visible()
            expect(page.get_by_text("Version 2 is the champion", exact=False).first).to_be_visible()

            def metric_row(name: str):
                return page.get_by_role("row").filter(has=page.get_by_role("link", name=name, exact=True))

            expect(metric_row("agreement")).to_contain_text("0.86")
            expect(metric_row("student_vs_teacher_speedup")).to_contain_text("4")
            expect(metric_row("student_vs_teacher_latency_ratio")).to_contain_text("0.25")
            expect(metric_row("promoted")).to_contain_text("1")
            screenshot(page, "run-overview")
            # The whole report renders in MLflow's artifact viewer: report.html, its plot inside.
            page.get_by_role("tab", name="Artifacts").click()
            page.get_by_text("report.html", exact=True).first.click()
            report = page.frame_locator("iframe").first
            expect(report.locator("img").first).to_be_visible()
            expect(report.get_by_role("table").first).to_be_visible()
            screenshot(page, "report-html")

            # The experiment's chart view: one bar per retrain for the headline.
            page.goto(experiment_url)
            page.locator("label:has(input[value=CHART])").click()
            page.get_by_placeholder("Search metric charts").fill("agreement")
            expect(page.get_by_text("agreement", exact=True).first).to_be_visible()
            screenshot(page, "experiment-charts")

            # MLflow's compare view lines the two retrains up, metric by metric, each counted once.
            runs = [RunSummary(run_id, "", "", None, None, experiment_id) for run_id in (first_run, second_run)]
            page.set_viewport_size({"width": 1500, "height": 2600})  # tall: the page scrolls inside a panel
            page.goto(ui_compare_url(runs, address))
            expect(page.get_by_text("Comparing 2 Runs from 1 Experiment")).to_be_visible()
            expect(page.get_by_text(first_name).first).to_be_visible()
            expect(page.get_by_text(second_name).first).to_be_visible()
            assert values_beside(page.get_by_role("link", name="agreement", exact=True)) == ["0.72", "0.86"]
            # Each run's report plot, side by side, as images.
            page.get_by_text("report.png", exact=True).first.click()
            plots = page.locator("img[alt='report.png']")
            expect(plots).to_have_count(2)
            for plot in plots.all():
                expect(plot).to_be_visible()
                assert plot.evaluate("image => image.naturalWidth") > 1000  # the 1430-pixel wide report.png
            screenshot(page, "compare")
            page.set_viewport_size({"width": 1500, "height": 900})

            # The registered student: version 2 holds the champion alias, version 1 does not.
            page.goto(model_url)
            versions = page.get_by_role("table")
            expect(versions.get_by_role("link", name="Version 2", exact=True)).to_be_visible()
            aliases_column = versions.get_by_role("columnheader").all_inner_texts().index("Aliases")

            def aliases_of(version: str):
                row = versions.get_by_role("row").filter(has=page.get_by_role("link", name=f"Version {version}", exact=True))
                return row.get_by_role("cell").nth(aliases_column)

            expect(aliases_of("2")).to_contain_text("champion")
            expect(aliases_of("1")).not_to_contain_text("champion")
            # The lineage and the decision read off each version's tags: its run, data version, and why.
            second_row = versions.get_by_role("row").filter(has=page.get_by_role("link", name="Version 2", exact=True))
            expect(second_row.get_by_role("status", name="data_version")).to_contain_text(re.compile(r"data_version\s*:\s*2\b"))
            expect(second_row.get_by_role("status", name="run_id")).to_contain_text(second_run)
            expect(second_row.get_by_role("status", name="promotion.reason")).to_contain_text("beats champion version 1")
            screenshot(page, "registered-model")
        finally:
            browser.close()
