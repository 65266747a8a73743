"""The console in a real browser (SPEC 11): Debian's chromium, headless, against a real
``flowd run`` with its broker and workers. A person opens the overview, runs a routine
and watches its trace go from RUNNING to DONE without reloading, retries a failed flow
and cancels a running one from their pages, and filters the flow list by state."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select
from webconsole import browser, start_console_daemon, wait_browser  # noqa: F401  (browser: a fixture)


def flow_id_of(url: str) -> int:
    return int(url.rstrip("/").rsplit("/", 1)[1])


def click(driver: Any, element_id: str) -> None:
    """Click a button of the live part of a page (it may be swapped in under our hand)."""
    wait_browser(lambda: driver.find_element(By.ID, element_id).click() or True, message=f"click {element_id}")


def state_on_page(driver: Any) -> str:
    return str(driver.find_element(By.ID, "flow-state").text)


def test_run_a_routine_and_watch_it_finish_live(tmp_path: Path, broker: Any, config_file: Any, flowd_proc: Any,
                                               browser: Any) -> None:  # noqa: F811
    # The overview shows the node; the routines page runs "slow" (quick -> 1.5 s -> quick) with
    # JSON input; the flow page shows it RUNNING and then DONE with the same document (no reload).
    daemon = start_console_daemon(tmp_path, broker, config_file, flowd_proc)
    browser.get(daemon.url + "/")
    assert "Overview" in browser.title
    assert browser.find_element(By.TAG_NAME, "html").get_attribute("data-js") == "on"  # console.js ran
    wait_browser(lambda: browser.find_element(By.ID, "broker").text == "connected", message="broker connected")
    browser.find_element(By.LINK_TEXT, "Routines").click()
    wait_browser(lambda: browser.find_element(By.ID, "input-slow"), message="the routines page").send_keys(
        '{"args": [7], "kwargs": {"reading": 312}}')
    browser.find_element(By.ID, "run-slow").click()
    wait_browser(lambda: "/flows/" in browser.current_url, message="the flow page")
    flow_id = flow_id_of(browser.current_url)
    browser.execute_script("window.sameDocument = 'yes';")
    wait_browser(lambda: state_on_page(browser) == "RUNNING", message="RUNNING shown")
    wait_browser(lambda: state_on_page(browser) == "DONE", message="DONE shown without a reload")
    assert browser.execute_script("return window.sameDocument") == "yes"
    result = wait_browser(lambda: browser.find_element(By.ID, "result").text, message="the result")
    assert '"reading": 312' in result and '"slept": 0' in result and "7" in result
    assert browser.find_elements(By.ID, "cancel") == [] and browser.find_elements(By.ID, "retry") == []
    stored = daemon.flow(flow_id)
    assert stored["state"] == "DONE" and stored["trigger"] == "api" and stored["args"] == [7]
    trace_rows = browser.find_elements(By.CSS_SELECTOR, "table.trace tbody.attempt.done")
    assert len(trace_rows) == 3

    # Input that is not JSON: the same page says what is wrong and keeps the text; nothing started.
    browser.get(daemon.url + "/routines")
    box = browser.find_element(By.ID, "input-slow")
    box.send_keys('{"kwargs": {"reading": }')
    browser.find_element(By.ID, "run-slow").click()
    error = wait_browser(lambda: browser.find_element(By.CSS_SELECTOR, "#routine-slow .notice.error").text,
                         message="the error on the routines page")
    assert "the input is not JSON" in error
    assert browser.find_element(By.ID, "input-slow").get_attribute("value") == '{"kwargs": {"reading": }'
    assert [f["id"] for f in daemon.flowctl("flows")] == [flow_id]


def test_retry_cancel_and_filter(tmp_path: Path, broker: Any, config_file: Any, flowd_proc: Any,
                                 browser: Any) -> None:  # noqa: F811
    # "fragile" fails while the marker file is missing. Its page shows FAILED with the error and
    # a Retry button; with the marker there, Retry takes it to DONE on the same page. A "slow"
    # flow of 30 s is cancelled from its page. /flows filtered by state lists only that state.
    daemon = start_console_daemon(tmp_path, broker, config_file, flowd_proc)
    client = daemon.client()
    token = client.csrf()
    for _ in range(2):
        status, headers, _ = client.post("/routines/fragile/run", {"csrf": token, "input": ""})
        assert status == 303
    failed_id = flow_id_of(headers["location"])
    browser.get(f"{daemon.url}/flows/{failed_id}")
    wait_browser(lambda: state_on_page(browser) == "FAILED", message="FAILED shown")
    assert "the marker file" in browser.find_element(By.ID, "flow-error").text
    daemon.marker.write_text("fixed\n")
    click(browser, "retry")
    wait_browser(lambda: state_on_page(browser) == "DONE", message="DONE after the retry")
    attempts = daemon.flow(failed_id)["trace"]
    assert [(a["task"], a["state"]) for a in attempts if a["task"] == "needs-marker"] == [
        ("needs-marker", "FAILED"), ("needs-marker", "DONE")]

    status, headers, _ = client.post("/routines/slow/run", {"csrf": token, "input": '{"kwargs": {"seconds": 30}}'})
    slow_id = flow_id_of(headers["location"])
    browser.get(f"{daemon.url}/flows/{slow_id}")
    wait_browser(lambda: state_on_page(browser) == "RUNNING", message="RUNNING")
    click(browser, "cancel")
    wait_browser(lambda: state_on_page(browser) == "CANCELLED", message="CANCELLED shown")
    assert daemon.flow(slow_id)["state"] == "CANCELLED"

    # Filter: one FAILED (the other fragile flow), one DONE, one CANCELLED.
    browser.get(daemon.url + "/flows")
    assert len(browser.find_elements(By.CSS_SELECTOR, "table.flows tbody tr")) == 3
    Select(wait_browser(lambda: browser.find_element(By.ID, "state-filter"), message="the filter")
           ).select_by_value("FAILED")
    browser.find_element(By.ID, "filter").click()
    wait_browser(lambda: "state=FAILED" in browser.current_url, message="the filtered list")

    def failed_rows() -> Any:
        rows = browser.find_elements(By.CSS_SELECTOR, "table.flows tbody tr")
        return rows if [r.find_element(By.CSS_SELECTOR, ".state").text for r in rows] == ["FAILED"] else None

    rows = wait_browser(failed_rows, message="only the FAILED flow listed")
    assert rows[0].find_element(By.CSS_SELECTOR, "td a").text == str(failed_id - 1)
