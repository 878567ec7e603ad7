"""The dashboard in a real headless Chromium, against CascadeFlow under uvicorn.

Log in, see the overview's charts drawn by plotly.js, send a request through
/v1/chat/completions and watch the counter and the spend chart change without a
reload (the ledger event arrives over the /ws/dashboard/ socket). Roles and
tenant isolation are checked through the browser too. A screenshot of the live
overview is saved under var/screenshots/ (CASCADEFLOW_SCREENSHOT_DIR).
"""

import os
import re
import secrets
import shutil
from pathlib import Path

import httpx
import pytest

from tests.conftest import skip_or_fail

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "correct-horse-battery-staple"


def chromium_path() -> str | None:
    return os.environ.get("CASCADEFLOW_CHROMIUM") or shutil.which("chromium")


@pytest.fixture
async def browser():
    path = chromium_path()
    if not path:
        skip_or_fail("Chromium is not installed (Debian: apt-get install chromium)")
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await p.chromium.launch(
            executable_path=path, headless=True, args=["--no-sandbox"]
        )
        yield browser
        await browser.close()


def add_member(server, tenant_slug: str, role: str) -> str:
    email = f"{role}-{secrets.token_hex(3)}@example.com"
    server.manage(
        "shell",
        "-c",
        "from django.contrib.auth import get_user_model; from tenants.models import Member, Tenant; "
        f"u = get_user_model().objects.create_user('{email}', '{email}', '{PASSWORD}'); "
        f"Member.objects.create(user=u, tenant=Tenant.objects.get(slug='{tenant_slug}'), role='{role}')",
    )
    return email


async def log_in(page, server, email: str) -> None:
    await page.goto(f"{server.base_url}/accounts/login/")
    await page.fill("#id_username", email)
    await page.fill("#id_password", PASSWORD)
    await page.click("button[type=submit]")
    await page.wait_for_url(re.compile(r".*/dashboard/t/.*"))


def number(text: str) -> int:
    return int(text.replace(",", "").strip())


async def test_the_overview_updates_live_and_roles_hold(browser, cascadeflow_server):
    server = cascadeflow_server
    slug = server.query("SELECT slug FROM tenants_tenant ORDER BY id LIMIT 1")[0][0]
    other = f"other-{secrets.token_hex(3)}"
    server.manage("create_tenant", other)
    owner = add_member(server, slug, "owner")
    viewer = add_member(server, slug, "viewer")

    context = await browser.new_context(viewport={"width": 1280, "height": 1000})
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    await log_in(page, server, owner)
    await page.goto(f"{server.base_url}/dashboard/t/{slug}/")

    # Charts drawn by plotly.js from the server-built figures.
    for name in ("forecast", "spend_hourly", "escalation", "rpm", "spend_daily"):
        await page.wait_for_selector(
            f'[data-figure="{name}"][data-rendered="1"] .main-svg', timeout=15_000
        )
    await page.wait_for_selector("#live-status.on", timeout=10_000)
    before = number(await page.inner_text("[data-testid=requests-count]"))
    spend_before = await page.inner_text("[data-testid=spend-total]")

    response = httpx.post(
        f"{server.base_url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {server.token}"},
        json={"model": "fake/gpt", "messages": [{"role": "user", "content": "Hello there"}]},
        timeout=30,
    )
    assert response.status_code == 200, response.text

    await page.wait_for_function(
        f"Number(document.querySelector('[data-testid=requests-count]').textContent"
        f".replace(/,/g, '')) === {before + 1}",
        timeout=5_000,
    )
    await page.wait_for_selector('[data-figure="spend_hourly"][data-updates]', timeout=5_000)
    assert await page.inner_text("[data-testid=spend-total]") != spend_before
    paid = await page.evaluate(
        "() => document.querySelector('[data-figure=\"spend_hourly\"]').data"
        ".find(t => t.name === 'Paid').y.reduce((a, b) => a + b, 0)"
    )
    assert paid > 0
    assert page.url.endswith(f"/dashboard/t/{slug}/")  # no reload happened
    shots = Path(os.environ.get("CASCADEFLOW_SCREENSHOT_DIR", ROOT / "var" / "screenshots"))
    shots.mkdir(parents=True, exist_ok=True)
    shot = shots / f"overview-{server.backend}.png"
    await page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000

    # A member of this tenant gets 404 on another tenant's pages.
    for path in ("", "tokens/", "end-users/"):
        assert (await page.goto(f"{server.base_url}/dashboard/t/{other}/{path}")).status == 404
    assert errors == []
    await context.close()

    # A viewer sees the overview but cannot reach the token page.
    context = await browser.new_context()
    page = await context.new_page()
    await log_in(page, server, viewer)
    assert await page.locator("nav.tabs >> text=API tokens").count() == 0
    response = await page.goto(f"{server.base_url}/dashboard/t/{slug}/tokens/")
    assert response.status == 403
    assert "Not allowed" in await page.inner_text("main")
    await context.close()
