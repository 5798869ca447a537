"""End to end in headless Chromium: EHR launch through the SMART simulator → patient page with risks, intervals
and SVG plots → a what-if changes the numbers → "write to chart" stores a RiskAssessment on the sandbox."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

import pytest
import requests
from ports import free_port

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
PATIENT = "ftp-0044"  # eligible for a statin change, BP lowering and an SGLT2 inhibitor
GENERATED = "https://fhirtwin.org/CodeSystem/fhirtwin|fhirtwin-generated"

if not os.path.exists(CHROMIUM):
    pytest.skip(f"Debian chromium is not installed at {CHROMIUM} (apt-get install -y chromium)",
                allow_module_level=True)


@pytest.fixture(scope="module")
def simulator(base_url: str, loaded_cohort) -> Iterator[dict[str, str]]:
    from fhirtwin.sandbox.smart_simulator import create_simulator, run_in_thread

    sim_port, app_port = free_port(), free_port()
    sim_url, app_url = f"http://127.0.0.1:{sim_port}", f"http://127.0.0.1:{app_port}"
    app = create_simulator(base_url, sim_url, redirect_uris=(f"{app_url}/callback",))
    server, thread = run_in_thread(app, sim_port)
    yield {"sim": sim_url, "app": app_url, "app_port": str(app_port), "iss": f"{sim_url}/fhir", "state": app.state.sim}
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def service(simulator: dict, start_service) -> str:
    return start_service(simulator["iss"], int(simulator["app_port"]))


def current_risk_assessments(base_url: str) -> list[dict]:
    bundle = requests.get(f"{base_url}/RiskAssessment", params={
        "subject": f"Patient/{PATIENT}", "_tag": GENERATED, "_count": 200}, headers={"Cache-Control": "no-cache"},
        timeout=30).json()
    return [e["resource"] for e in bundle.get("entry", [])]


def test_ehr_launch_page_whatif_and_write(simulator: dict, service: str, base_url: str, tmp_path) -> None:
    from playwright.sync_api import expect, sync_playwright

    launch = requests.post(f"{simulator['sim']}/launch-context", json={"patient": PATIENT}, timeout=10).json()
    before = {r["id"] for r in current_risk_assessments(base_url)}
    proxied_before = simulator["state"].proxied

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 1600})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("response", lambda r: errors.append(f"{r.status} {r.url}")
                    if r.status >= 400 and not r.url.endswith("/favicon.ico") else None)
            page.goto(f"{service}/launch?iss={launch['iss']}&launch={launch['launch']}", timeout=120_000)
            page.wait_for_url(f"{service}/patient", timeout=120_000)

            # risks with 90 % intervals, for the four outcomes
            for outcome in ("total_cvd", "ascvd", "heart_failure", "kidney_failure"):
                cell = page.locator(f"#risk-{outcome}")
                expect(cell).to_contain_text("%")
                expect(cell.locator(".interval")).to_contain_text("90 % interval")
            # inline SVG plots with a median line and a band
            expect(page.locator("#chart-risk-total_cvd svg polyline.median")).to_have_count(1)
            expect(page.locator("#chart-risk-total_cvd svg polygon.band")).to_have_count(1)
            assert page.locator("svg.chart").count() >= 4
            expect(page.locator("#ledger")).to_contain_text("Data-quality ledger")
            # every one of the seven scales says whether it moved the forecast, was used, only read, or had no data
            scales = page.locator("#scales li")
            expect(scales).to_have_count(7)
            assert [t.split(":")[0] for t in scales.all_inner_texts()] == [
                "molecular", "cellular", "tissue", "organ", "clinical", "behavioral", "environmental"]

            # what-if: toggle the first eligible intervention; the server recomputes
            baseline_total = page.locator("#risk-total_cvd .value").inner_text()
            page.locator("#toggle-0").check()
            expect(page.locator("#whatif-status")).to_have_attribute("data-done", re.compile(r"\d+"))
            whatif_total = page.locator("#whatif-total_cvd").inner_text()
            assert whatif_total not in ("–", "") and "%" in whatif_total
            assert not whatif_total.startswith(baseline_total), (baseline_total, whatif_total)
            expect(page.locator("#arr-total_cvd")).to_contain_text("points")
            # current care and the selection, in the same chart
            expect(page.locator("#chart-risk-total_cvd svg polyline.median")).to_have_count(2)

            # write to chart with the user's token
            page.locator("#write-button").click()
            result = page.locator("#write-result")
            expect(result).to_have_attribute("data-status", re.compile(r"^(written|unchanged)$"),
                                             timeout=120_000)
            status = result.get_attribute("data-status")
            page.screenshot(path=str(tmp_path / "patient-page.png"), full_page=True)
            assert not errors, errors
        finally:
            browser.close()

    after = current_risk_assessments(base_url)
    assert after, "no RiskAssessment for the patient on the sandbox"
    assert all(r["subject"]["reference"] == f"Patient/{PATIENT}" for r in after)
    if status == "written":
        assert {r["id"] for r in after} - before, "the page said written but nothing new is on the server"
    # every FHIR call of the app went through the simulator with a valid bearer token
    assert simulator["state"].proxied > proxied_before
    assert (tmp_path / "patient-page.png").stat().st_size > 10_000
