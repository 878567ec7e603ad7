"""The dashboard in a real headless Chromium, against CascadeFlow under uvicorn.

Log in, see the overview's charts drawn by plotly.js, send a request through
/v1/chat/completions and watch the counter, the spend chart and the budget
gauge change without a reload (the ledger event arrives over the
/ws/dashboard/ socket). Every page is laid out at a desktop and a phone width
and measured: each chart's tick labels, titles, legend entries and
annotations lie inside the chart and never overlap, nothing runs off the page,
and no page logs a console error. Roles and tenant isolation are checked
through the browser too. Screenshots of every page at both widths are saved
under var/screenshots/ (CASCADEFLOW_SCREENSHOT_DIR).
"""

import os
import re
import secrets
import shutil
from pathlib import Path

import httpx
import pytest

from tests.support.services import skip_or_fail

pytestmark = [pytest.mark.browser, pytest.mark.services, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "correct-horse-battery-staple"
WIDTHS = (1280, 390)
DEMO_EMAIL, DEMO_PASSWORD = "demo@cascadeflow.local", "cascadeflow-demo"

# Boxes of every text a chart draws, checked against the chart and each other.
# Tolerance: half a pixel (anti-aliasing), never a visible overlap.
MEASURE_CHARTS = """() => {
  const kinds = {
    title: '.g-gtitle .gtitle', 'axis title': '.g-xtitle text, .g-ytitle text, .g-y2title text',
    'x tick': '.xtick text', 'y tick': '.ytick text', 'y2 tick': '.y2tick text',
    legend: '.legend .traces', annotation: '.annotation-text', number: '.numbers text',
    'gauge tick': '.xangularaxistick text', toolbar: '.modebar-container .modebar',
  };
  const tol = 0.5, report = [];
  document.querySelectorAll('[data-figure]').forEach(function (el) {
    const chart = el.getBoundingClientRect(), items = [];
    for (const [kind, selector] of Object.entries(kinds)) {
      el.querySelectorAll(selector).forEach(function (node) {
        const r = node.getBoundingClientRect();
        const text = kind === 'toolbar' ? 'toolbar' : (node.textContent || '').trim();
        if (r.width >= 0.5 && r.height >= 0.5 && text) items.push({kind, text, r});
      });
    }
    const problems = [];
    if (el.dataset.rendered !== '1') problems.push('not drawn');
    items.forEach(function (a) {
      if (a.r.left < chart.left - tol || a.r.right > chart.right + tol ||
          a.r.top < chart.top - tol || a.r.bottom > chart.bottom + tol)
        problems.push(a.kind + " '" + a.text + "' runs outside the chart");
    });
    for (let i = 0; i < items.length; i++) for (let j = i + 1; j < items.length; j++) {
      const a = items[i].r, b = items[j].r;
      const w = Math.min(a.right, b.right) - Math.max(a.left, b.left);
      const h = Math.min(a.bottom, b.bottom) - Math.max(a.top, b.top);
      if (w > tol && h > tol)
        problems.push(items[i].kind + " '" + items[i].text + "' overlaps " + items[j].kind + " '" + items[j].text + "'");
    }
    report.push({name: el.dataset.figure, items: items.length, problems: problems,
                 narrow: el.dataset.narrow === '1'});
  });
  return {charts: report, pageWidth: document.documentElement.scrollWidth, viewport: window.innerWidth};
}"""


def chromium_path() -> str | None:
    return os.environ.get("CASCADEFLOW_CHROMIUM") or shutil.which("chromium")


def screenshots_dir() -> Path:
    shots = Path(os.environ.get("CASCADEFLOW_SCREENSHOT_DIR", ROOT / "var" / "screenshots"))
    shots.mkdir(parents=True, exist_ok=True)
    return shots


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


_seeded: set[str] = set()


@pytest.fixture
def demo_tenant(cascadeflow_server):
    """The demo tenant (three days of history through the demo models), once per server."""
    server = cascadeflow_server
    if server.database_url not in _seeded:
        server.manage("seed_demo", "--history-days", "3", "--history-requests", "150")
        _seeded.add(server.database_url)
    return "demo"


def prepare(
    server, *, create: str, members: tuple[tuple[str, str], ...] = (), then: str = ""
) -> tuple[str, list[str]]:
    """In one manage.py process (each is a Django start): the tenant ``create``, the
    members ``(tenant slug, role)`` with PASSWORD, then the statements ``then``.
    Returns the new tenant's API token and the members' emails."""
    emails = [f"{role}-{secrets.token_hex(3)}@example.com" for _, role in members]
    script = [
        "import io",
        "from django.contrib.auth import get_user_model",
        "from django.core.management import call_command",
        "from tenants.models import Member, Tenant",
        "out = io.StringIO()",
        f"call_command('create_tenant', {create!r}, stdout=out)",
    ]
    for email, (tenant_slug, role) in zip(emails, members, strict=True):
        script.append(
            f"u = get_user_model().objects.create_user({email!r}, {email!r}, {PASSWORD!r})"
        )
        script.append(
            f"Member.objects.create(user=u, tenant=Tenant.objects.get(slug={tenant_slug!r}), "
            f"role={role!r})"
        )
    script += [then, "print(out.getvalue().strip().splitlines()[-1])"]
    token = server.manage("shell", "-c", "\n".join(script)).strip().splitlines()[-1]
    return token, emails


async def log_in(page, server, email: str, password: str = PASSWORD) -> None:
    await page.goto(f"{server.base_url}/accounts/login/")
    await page.fill("#id_username", email)
    await page.fill("#id_password", password)
    await page.click("button[type=submit]")
    await page.wait_for_url(re.compile(r".*/dashboard/t/.*"))


def watch_console(page) -> list[str]:
    """Console errors (a failed resource load is one) and uncaught exceptions."""
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(f"uncaught: {exc}"))
    page.on(
        "console",
        lambda msg: (
            errors.append(f"console: {msg.text} ({msg.location.get('url', '')})")
            if msg.type == "error"
            else None
        ),
    )
    return errors


async def charts_drawn(page) -> None:
    await page.wait_for_function(
        "() => [...document.querySelectorAll('[data-figure]')]"
        ".every(e => e.dataset.rendered === '1')",
        timeout=15_000,
    )


async def layout_problems(page, where: str, width: int) -> list[str]:
    """What is clipped, overlapping or off the page, as readable lines."""
    await charts_drawn(page)
    result = await page.evaluate(MEASURE_CHARTS)
    problems = [
        f"{where} @{width}px, chart {c['name']}: {p}"
        for c in result["charts"]
        for p in c["problems"]
    ]
    if result["pageWidth"] > result["viewport"] + 1:
        problems.append(f"{where} @{width}px: the page is {result['pageWidth']}px wide")
    wrong = [
        c["name"]
        for c in result["charts"]
        if not c["name"].startswith("gauge") and c["narrow"] != (width < 600)
    ]
    if wrong:
        problems.append(f"{where} @{width}px: charts {wrong} did not pick their layout")
    return problems


def number(text: str) -> int:
    return int(text.replace(",", "").strip())


async def test_the_overview_updates_live_and_roles_hold(browser, cascadeflow_server):
    server = cascadeflow_server
    slug = server.query("SELECT slug FROM tenants_tenant ORDER BY id LIMIT 1")[0][0]
    other = f"other-{secrets.token_hex(3)}"
    _, (owner, viewer) = prepare(server, create=other, members=((slug, "owner"), (slug, "viewer")))

    context = await browser.new_context(viewport={"width": 1280, "height": 1000})
    page = await context.new_page()
    errors = watch_console(page)
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
    shot = screenshots_dir() / f"overview-live-{server.backend}.png"
    await page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000

    # A member of this tenant gets 404 on another tenant's pages.
    for path in ("", "tokens/", "end-users/"):
        assert (await page.goto(f"{server.base_url}/dashboard/t/{other}/{path}")).status == 404
    errors = [e for e in errors if "404" not in e]  # the pages just asked for
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


async def test_every_page_fits_at_desktop_and_phone_widths(
    browser, cascadeflow_server, demo_tenant
):
    """Every page of a tenant with history, and the chart pages of a tenant with one
    request (sub-cent money, counts of one), at 1280 and 390 px: no clipped or
    overlapping label on any chart, nothing off the page, no console error."""
    server = cascadeflow_server
    budget_id = server.query(
        "SELECT b.id FROM tenants_budget b JOIN tenants_tenant t ON t.id = b.tenant_id "
        "WHERE t.slug = %s ORDER BY b.id LIMIT 1",
        (demo_tenant,),
    )[0][0]
    pages = {
        "overview": "",
        "models": "models/",
        "profile": "profiles/support/",
        "end-users": "end-users/",
        "tokens": "tokens/",
        "provider-keys": "provider-keys/",
        "budgets": "budgets/",
        "budget-edit": f"budgets/{budget_id}/",
        "exports": "exports/",
        "billing": "billing/",
        "members": "members/",
    }
    fresh = f"fresh-{secrets.token_hex(3)}"
    token, (fresh_owner,) = prepare(server, create=fresh, members=((fresh, "owner"),))
    response = httpx.post(
        f"{server.base_url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {token}"},
        json={"model": "fake/gpt", "messages": [{"role": "user", "content": "Hi"}]},
        timeout=30,
    )
    assert response.status_code == 200, response.text

    shots = screenshots_dir()
    problems: list[str] = []
    for width in WIDTHS:
        context = await browser.new_context(viewport={"width": width, "height": 900})
        page = await context.new_page()
        errors = watch_console(page)
        await page.goto(f"{server.base_url}/accounts/login/")
        await page.screenshot(path=str(shots / f"login-{width}-{server.backend}.png"))
        await log_in(page, server, DEMO_EMAIL, DEMO_PASSWORD)
        for name, path in pages.items():
            response = await page.goto(f"{server.base_url}/dashboard/t/{demo_tenant}/{path}")
            assert response.status == 200, (name, response.status)
            problems += await layout_problems(page, name, width)
            await page.screenshot(
                path=str(shots / f"{name}-{width}-{server.backend}.png"), full_page=True
            )
        problems += [f"{width}px: {e}" for e in errors]
        await context.close()

        context = await browser.new_context(viewport={"width": width, "height": 900})
        page = await context.new_page()
        errors = watch_console(page)
        await log_in(page, server, fresh_owner)
        for name, path in (("overview", ""), ("models", "models/")):
            await page.goto(f"{server.base_url}/dashboard/t/{fresh}/{path}")
            problems += await layout_problems(page, f"new tenant {name}", width)
            await page.screenshot(
                path=str(shots / f"new-tenant-{name}-{width}-{server.backend}.png"),
                full_page=True,
            )
        ticks = await page.evaluate(
            "() => [...document.querySelectorAll('[data-figure] .ytick text')]"
            ".map(t => t.textContent)"
        )
        problems += [f"{width}px: SI-prefixed money tick {t!r}" for t in ticks if "µ" in t]
        problems += [f"{width}px: {e}" for e in errors]
        await context.close()

    assert problems == []


async def test_the_budget_gauge_changes_colour_across_a_threshold(browser, cascadeflow_server):
    """A tenant budget just below its warn threshold: one request crosses it, and the
    gauge turns from the ok colour to the warn colour without a reload."""
    server = cascadeflow_server
    slug = f"gauge-{secrets.token_hex(3)}"
    token, (owner,) = prepare(
        server,
        create=slug,
        members=((slug, "owner"),),
        then="from django.utils import timezone; from tenants.budgets import period_bounds; "
        "from tenants.models import Budget, BudgetCounter, Tenant; "
        f"t = Tenant.objects.get(slug='{slug}'); "
        "Budget.objects.filter(tenant=t).delete(); "
        "b = Budget.objects.create(tenant=t, scope='tenant', period='month', "
        "limit_nanos=10**9, warn_pct=80, degrade_pct=90, block_pct=100); "
        "s, e = period_bounds('month', timezone.now(), t.time_zone); "
        "BudgetCounter.objects.create(tenant=t, budget=b, subject_id=0, period_start=s, "
        "period_end=e, spent_nanos=8 * 10**8 - 10)",
    )
    context = await browser.new_context(viewport={"width": 1280, "height": 1000})
    page = await context.new_page()
    errors = watch_console(page)
    await log_in(page, server, owner)
    await page.goto(f"{server.base_url}/dashboard/t/{slug}/")
    await charts_drawn(page)
    await page.wait_for_selector("#live-status.on", timeout=10_000)
    colour = "() => getComputedStyle(document.querySelector('[data-figure=gauge_0] .value-arc path')).fill"
    before = await page.evaluate(colour)
    assert await page.inner_text("[data-gauge-state]") == "ok"

    response = httpx.post(
        f"{server.base_url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {token}"},
        json={"model": "fake/gpt", "messages": [{"role": "user", "content": "Over the line"}]},
        timeout=30,
    )
    assert response.status_code == 200, response.text

    await page.wait_for_function(
        "() => document.querySelector('[data-gauge-state]').textContent === 'warn'",
        timeout=5_000,
    )
    after = await page.evaluate(colour)
    assert after != before
    assert (before, after) == ("rgb(18, 128, 92)", "rgb(220, 104, 3)")  # ok green, warn amber
    await page.screenshot(path=str(screenshots_dir() / f"gauge-warn-{server.backend}.png"))
    assert errors == []
    await context.close()


async def test_provider_keys_are_added_refused_rotated_and_deleted_in_the_browser(
    browser, cascadeflow_server, fake_upstream
):
    """The provider-key form shows the fields of the chosen provider, shows the provider's
    refusal in the form, and never puts a key back into a page; rotation swaps the mask."""
    server = cascadeflow_server
    slug = f"byok-{secrets.token_hex(3)}"
    _, (owner,) = prepare(server, create=slug, members=((slug, "owner"),))
    good, newer, bad = (f"sk-{name}-{secrets.token_hex(12)}" for name in ("good", "new", "bad"))
    fake_upstream.keys_accepted = {good, newer}
    try:
        context = await browser.new_context(viewport={"width": 1280, "height": 1000})
        page = await context.new_page()
        errors = watch_console(page)
        page.on("dialog", lambda dialog: dialog.accept())
        await log_in(page, server, owner)
        await page.goto(f"{server.base_url}/dashboard/t/{slug}/provider-keys/")

        await page.select_option("#id_provider", "bedrock")
        assert await page.is_visible("#id_aws_secret_access_key")
        assert not await page.is_visible("#id_api_base")
        await page.select_option("#id_provider", "compatible")
        assert await page.is_visible("#id_api_base") and await page.is_visible("#id_api_key")
        assert not await page.is_visible("#id_aws_secret_access_key")

        await page.fill("#id_name", "byok/own")
        await page.fill("#id_model", "own-gpt")
        await page.fill("#id_api_base", fake_upstream.api_base)
        await page.fill("#id_api_key", bad)
        await page.fill("#id_input_usd_per_mtok", "1.5")
        await page.fill("#id_output_usd_per_mtok", "6")
        await page.click("text=Check and save")
        await page.wait_for_selector(".errorlist")
        assert "refused these credentials" in await page.inner_text("form.stack")
        assert await page.input_value("#id_api_key") == ""  # write-only, even on an error
        assert await page.input_value("#id_name") == "byok/own"
        assert bad not in await page.content()

        await page.fill("#id_api_key", good)
        await page.click("text=Check and save")
        row = page.locator("[data-testid^=provider-model-]")
        await row.wait_for()
        assert f"…{good[-4:]}" in await row.inner_text()
        assert good not in await page.content()
        for width in WIDTHS:
            await page.set_viewport_size({"width": width, "height": 900})
            assert await layout_problems(page, "provider keys", width) == []
            await page.screenshot(
                path=str(screenshots_dir() / f"provider-keys-row-{width}-{server.backend}.png"),
                full_page=True,
            )
        await page.set_viewport_size({"width": 1280, "height": 1000})

        await page.click("text=Rotate key")
        await page.fill("#id_api_key", newer)
        await page.click("text=Check and replace")
        await page.wait_for_selector("text=new key in use")
        assert f"…{newer[-4:]}" in await row.inner_text()
        assert newer not in await page.content() and good not in await page.content()

        await page.click("[data-testid^=provider-model-] >> text=Delete")
        await page.wait_for_selector("text=No provider models yet")
        assert errors == []
        await context.close()
    finally:
        fake_upstream.keys_accepted = None
