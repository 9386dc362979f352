"""A real browser (Debian's chromium, driven by Playwright) logged in to the local stack's Airflow UI."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from dtp.local.config import PROJECT_ROOT, StackConfig

CHROMIUM = "/usr/bin/chromium"
# Screenshots of every step; CI keeps the folder when a test fails.
ARTIFACTS = PROJECT_ROOT / "test-artifacts" / "ui"


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser, stack: StackConfig) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.goto(stack.airflow_url)
    page.get_by_label("Username").fill("admin")
    page.get_by_label("Password").fill(stack.passwords()["admin"])
    page.get_by_role("button", name="Sign in").click()
    page.get_by_role("link", name=re.compile("Dags")).first.wait_for()
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
