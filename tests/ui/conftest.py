"""A real browser (Debian's chromium, driven by Playwright) logged in to the local stack's Airflow UI."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from dtp.local.config import PROJECT_ROOT, StackConfig

CHROMIUM = "/usr/bin/chromium"
# Screenshots of every step; CI keeps the folder when a test fails.
ARTIFACTS = PROJECT_ROOT / "test-artifacts" / "ui"
VIEWPORT = {"width": 1400, "height": 1000}
TIMEOUT_MS = 30_000


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="session")
def signed_in(browser: Browser, stack: StackConfig) -> dict[str, Any]:
    """The cookies and local storage of a browser signed in to the UI as admin through its login form, once: each
    test's page starts from them rather than loading the UI twice more to sign in again."""
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(stack.airflow_url)
    page.get_by_label("Username").fill("admin")
    page.get_by_label("Password").fill(stack.passwords()["admin"])
    page.get_by_role("button", name="Sign in").click()
    page.get_by_role("link", name=re.compile("Dags")).first.wait_for()
    state = context.storage_state()
    context.close()
    return dict(state)


@pytest.fixture
def page(browser: Browser, signed_in: dict[str, Any]) -> Iterator[Page]:
    """A page of a fresh browser context signed in as admin, on no page yet."""
    context = browser.new_context(viewport=VIEWPORT, storage_state=signed_in)  # type: ignore[arg-type]
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    yield page
    context.close()


class Shots:
    """Numbered screenshots of one test: test-artifacts/ui/<test>/<n>-<step>.png."""

    def __init__(self, page: Page, name: str) -> None:
        self.page, self.count = page, 0
        self.folder = ARTIFACTS / name
        self.folder.mkdir(parents=True, exist_ok=True)

    def __call__(self, step: str, full_page: bool = False) -> Path:
        self.count += 1
        path = self.folder / f"{self.count:02d}-{step}.png"
        self.page.screenshot(path=str(path), full_page=full_page)
        return path


@pytest.fixture
def shot(page: Page, request: pytest.FixtureRequest) -> Shots:
    return Shots(page, request.node.name)
