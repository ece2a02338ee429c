"""The dashboard in a real browser: headless Chromium (Debian's `chromium` package) driven by
Playwright for Python, against real servers on loopback: `selfreward ui` over an artifact folder
(a finished run and a run in progress) and the coordinator (real Redis) for the actions.

Screenshots are saved as test artifacts in $SELFREWARD_TEST_ARTIFACTS (default: the test's
tmp_path)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dashboard_run import finished_run, reward_model, running_run, stage_done, write_progress

from selfreward.storage import load_jsonl
from selfreward.testing.servers import background, free_port, wait_http

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
TOKEN = "browser-token"
SELFREWARD = [sys.executable, "-m", "selfreward.cli.main"]

pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="the browser tests need Debian's chromium: sudo apt-get install chromium (make setup does it as root)",
)


def screenshot_dir(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("SELFREWARD_TEST_ARTIFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture()
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" and "401" not in m.text else None)
    yield pg
    context.close()
    assert not errors, errors  # no script error on any page


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("browser") / "artifacts"
    finished_run(root, "demo")
    running_run(root, "live")
    return root


@pytest.fixture(scope="module")
def ui(artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("ui-log") / "ui.log"
    with background([*SELFREWARD, "ui", str(artifacts), "--port", str(port)], log, env()) as proc:
        wait_http(f"http://127.0.0.1:{port}/ui/api/info", 60, proc, log)
        yield f"http://127.0.0.1:{port}"


def test_a_finished_run_runs_list_metrics_curves_and_data(
    ui: str, artifacts: Path, page: Any, tmp_path: Path
) -> None:
    page.goto(f"{ui}/ui/")
    page.wait_for_selector("#runs tr[data-run=demo]")
    assert page.inner_text("#runs tr[data-run=demo] .state") == "done"
    assert page.inner_text("#runs tr[data-run=live] .state") == "running"
    assert "self-reward" in page.inner_text("#runs tr[data-run=demo]")
    page.click("#runs tr[data-run=demo] a")
    page.wait_for_url(f"{ui}/ui/runs/demo")
    page.wait_for_selector("#timeline tr[data-t='2']")
    assert page.locator("#timeline .chip.done").count() == 3 + 2 * 7
    # the summary a person reads first, from the evaluations' reports
    report = json.loads((artifacts / "runs/demo/eval/iter-1/report.json").read_text())
    first = page.inner_text("#summaries .summary[data-t='1']")
    lo, _hi = report["head2head"]["intervals"]["win_rate"]
    assert first.startswith(
        f"M2 vs M1: win rate {100 * report['head2head']['win_rate']:.1f}% [{100 * lo:.1f}%, "
    )
    agreement = [reward_model(t)["pairwise_accuracy"] for t in (1, 2)]
    assert f"judge agreement with humans {100 * agreement[0]:.1f}%;" in first and first.endswith(
        "No evidence of a difference."
    )
    second = page.inner_text("#summaries .summary[data-t='2']")
    change = f"({100 * (agreement[1] - agreement[0]):+.1f} points)"
    assert f"judge agreement with humans {100 * agreement[1]:.1f}% {change}" in second and second.endswith(
        "M3 is better than M2."
    )
    # charts: trends and training curves are SVGs with points
    assert page.locator("#metrics svg.chart").count() >= 5
    curves = page.locator("#curves svg.chart")
    assert curves.count() >= 3
    loss = page.locator("#curves .chart-box", has_text="Training loss")
    assert loss.locator("circle.point").count() == 5 + 4 + 4  # m1's 5 logged steps, m2's and m3's 4
    assert page.locator("#wall tr").count() > 5
    page.click("#config > summary")
    assert "iterations" in page.inner_text("#config .config") and "2" in page.inner_text("#config .config")
    page.click("#config-defaults > summary")
    assert "default" in page.inner_text("#config-defaults")
    page.screenshot(path=str(screenshot_dir(tmp_path) / "dashboard-run.png"), full_page=True)

    # the iteration, then its data browser: the pair's text comes from pairs.jsonl
    page.click("#timeline tr[data-t='1'] a")
    page.wait_for_selector("#stages tr.stage[data-stage=pairs][data-state=done]")
    assert page.locator("#resume").count() == 0  # read-only: no actions in the embedded mode
    page.click("#data-link")
    page.wait_for_url(f"{ui}/ui/runs/demo/iterations/1/data")
    page.wait_for_selector("#items .item")
    pairs = load_jsonl(artifacts / "runs" / "demo" / "iter-1" / "pairs.jsonl")
    first_item = page.locator("#items .item").first
    assert first_item.get_attribute("data-prompt") == pairs[0]["prompt_id"]
    for side in ("chosen", "rejected"):  # the text of pairs.jsonl, under its score
        shown = first_item.locator(f".pair .{side}").inner_text().strip()
        assert shown == f"{side} ({pairs[0][side + '_score']:.2f})\n" + pairs[0][side][0]["content"].strip()
    first_item.locator("details summary").click()
    assert first_item.locator(".cands tr[data-candidate]").count() == 3
    assert "Score: 4" in first_item.locator(".cands").inner_text()
    assert page.locator(".eval-example").count() == 8 and page.locator("#eval-next").count() == 0
    assert "m2 says answer 0" in page.locator(".eval-example").first.inner_text()
    page.screenshot(path=str(screenshot_dir(tmp_path) / "dashboard-data.png"), full_page=True)
    # filters and search go through the URL (linkable)
    page.select_option("#filters select[name=filter]", "parse_failures")
    page.click("#filters button")
    page.wait_for_url("**/data?filter=parse_failures")
    page.wait_for_selector("#items .item")
    assert [
        page.locator("#items .item").nth(i).get_attribute("data-prompt")
        for i in range(page.locator("#items .item").count())
    ] == ["it1-p1"]
    page.goto(f"{ui}/ui/runs/demo/iterations/1/data?view=prompts&filter=dropped")
    page.wait_for_selector("#items .item")
    assert page.locator("#items .item").count() == 1 and "No pair" in page.inner_text("#items .item")
    page.goto(f"{ui}/ui/runs/demo/iterations/1/data?eval_limit=3")  # evaluation examples page too
    page.wait_for_selector("#eval-next")
    assert [page.locator(".eval-example").nth(i).get_attribute("data-prompt") for i in range(3)] == [
        "e0",
        "e1",
        "e2",
    ]
    page.click("#eval-next")
    page.wait_for_selector(".eval-example[data-prompt=e3]")
    assert page.locator(".eval-example").count() == 3
    page.goto(f"{ui}/ui/runs/demo/iterations/1/data?limit=2")
    page.wait_for_selector("#next")
    page.click("#next")
    page.wait_for_selector("#items .item")
    assert page.locator("#items .item").first.get_attribute("data-prompt") == pairs[2]["prompt_id"]


def test_a_run_in_progress_updates_live(ui: str, artifacts: Path, page: Any, tmp_path: Path) -> None:
    layout_root = artifacts
    from selfreward.storage import RunLayout

    layout = RunLayout(layout_root, "live")
    page.goto(f"{ui}/ui/runs/live/iterations/1")
    row = "#stages tr.stage[data-stage=candidates]"
    page.wait_for_selector(f"{row}[data-state=running]")
    bar = page.locator(f"{row} .bar")
    assert bar.get_attribute("data-done") == "3" and bar.get_attribute("data-total") == "12"
    width = lambda: float(page.locator(f"{row} .bar .fill").evaluate("e => e.style.width").rstrip("%"))  # noqa: E731
    assert width() == pytest.approx(25.0)
    assert "3/12" in page.inner_text(f"{row} .progress-text") and "ETA" in page.inner_text(
        f"{row} .progress-text"
    )
    write_progress(layout, 1, "candidates", 9, 12)  # the stage advances: the page follows by polling
    page.wait_for_selector(f"{row} .bar[data-done='9']", timeout=10_000)
    assert width() == pytest.approx(75.0)
    page.screenshot(path=str(screenshot_dir(tmp_path) / "dashboard-live.png"), full_page=True)
    # the stage finishes: done, and the next one runs
    stage_done(layout, 1, "candidates", 12.0, count=12)
    write_progress(layout, 1, "judgments", 1, 12)
    page.wait_for_selector(f"{row}[data-state=done]", timeout=10_000)
    page.wait_for_selector("#stages tr.stage[data-stage=judgments][data-state=running]", timeout=10_000)
    # the runs list shows the run live too
    page.goto(f"{ui}/ui/runs/live")
    page.wait_for_selector("#timeline tr[data-t='1'] .chip.running")
    assert "judgments 1/12" in page.inner_text("#timeline tr[data-t='1']")


def test_resume_a_failed_iteration_from_the_coordinator_page(
    redis_url: str, redis_conn: Any, tmp_path: Path, page: Any
) -> None:
    from rq import Queue

    from selfreward.config import load_config
    from selfreward.drivers.state import IterationState, RunStore

    root = tmp_path / "artifacts"
    layout = running_run(root, "broken")
    layout.stage_progress(1, "candidates").unlink()
    store = RunStore(redis_conn)
    assert store.create_run(load_config(layout.config_path))
    error = "stage 'candidates' failed: prompts.jsonl:3: field 'prompt' is empty"
    store.save_iteration(
        "broken", IterationState(1, "failed", {}, error, "candidates", time.time() - 30, time.time(), 0)
    )
    port = free_port()
    log = tmp_path / "coordinator.log"
    cenv = {**env(), "REDIS_URL": redis_url, "SELFREWARD_API_TOKEN": TOKEN}
    cmd = [*SELFREWARD, "serve", "coordinator", "--host", "127.0.0.1", "--port", str(port)]
    with background(cmd, log, cenv) as proc:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/healthz", 60, proc, log)
        page.goto(f"{url}/ui/runs/broken/iterations/1")
        page.wait_for_selector("#auth input#token")  # the data needs the token: the page asks for it
        page.fill("#auth input#token", TOKEN)
        page.click("#auth button[type=submit]")
        page.wait_for_selector("#stages tr.stage[data-stage=candidates]")
        assert "prompts.jsonl:3" in page.inner_text("#iteration-error")
        assert page.get_attribute("#stages tr.stage[data-stage=prompts]", "data-state") == "done"
        assert page.get_attribute("#stages tr.stage[data-stage=candidates]", "data-state") == "failed"
        assert "record prompts.jsonl:3" in page.inner_text("#stages tr.stage-error")
        assert page.locator("#resume").is_enabled()
        page.screenshot(path=str(screenshot_dir(tmp_path) / "dashboard-failed.png"), full_page=True)
        page.click("#resume")
        page.wait_for_selector("#flash:has-text('resume: queued')", timeout=10_000)
        state = store.iteration("broken", 1)
        assert state is not None and state.status != "failed" and state.attempt == 1
        assert "1:candidates" in state.jobs and Queue("generate", connection=redis_conn).count == 1
        page.wait_for_selector("#stages tr.stage[data-stage=candidates][data-state=queued]", timeout=10_000)
        assert json.loads(redis_conn.hget("selfreward:run:broken:iter:1", "jobs"))  # the chain is stored
        # cancel from the page: the queued chain stops, the iteration can be resumed again
        page.wait_for_selector("#cancel:not([disabled])")
        page.click("#cancel")
        page.wait_for_selector("#flash:has-text('cancel: ')", timeout=10_000)
        assert store.iteration("broken", 1).status == "cancelled"
        assert Queue("generate", connection=redis_conn).count == 0
        page.wait_for_selector("#resume:not([disabled])", timeout=10_000)
