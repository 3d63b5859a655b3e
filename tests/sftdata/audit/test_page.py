"""The audit's HTML page opened in a real browser (Debian's chromium, headless, through Selenium
and chromedriver): no console errors, every listed record reachable, the highlighted token count
equal to the shards' trained count, a screenshot written as a test artifact."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.sftdata.audit.test_audit import planted

BIN = Path(sys.executable).parent
CHROMIUM, DRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


def _browser():
    if not (CHROMIUM.is_file() and DRIVER.is_file()):
        if os.environ.get("CI"):
            pytest.fail("chromium and chromedriver are missing but CI=true: .ci/run installs them")
        pytest.skip("Debian's chromium and chromium-driver are not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1200,1600"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(str(DRIVER)), options=opts)


def _shard_trained(shards: Path, record_id: str) -> int:
    from sftdata.shards import ShardReader

    reader = ShardReader(shards)
    row, seg = reader.find_record(record_id)
    r = reader[row]
    lens = np.asarray(r["seq_lens"])
    start = int(lens[:seg].sum())
    return int((np.asarray(r["labels"])[start : start + int(lens[seg])] != -100).sum())


def test_the_page_in_a_browser(tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    files = planted(tmp_path)
    common = ["--tokenizer", "tiny", "--template", "chatml"]
    r = subprocess.run([str(BIN / "sftdata"), "audit", str(files["train"]), "--validation",
                        str(files["validation"]), "--eval", str(files["eval"]), "--seq-len", "150",
                        "--html", "page.html", "--fail-on", "none", *common],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr
    p = subprocess.run([str(BIN / "sftdata"), "pack", "train.jsonl", "-o", "shards", "--seq-len",
                        "2048", "--skip-invalid", *common],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert p.returncode == 0, p.stderr
    driver = _browser()
    try:
        driver.get((tmp_path / "page.html").as_uri())
        assert driver.title == "sftdata audit"
        severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert severe == []
        # every record a check lists links to its view, and every link lands on one
        for table in driver.find_elements(By.CSS_SELECTOR, "h2[id^=check-] + table"):
            rows = table.find_elements(By.CSS_SELECTOR, "tr")[1:]
            links = table.find_elements(By.CSS_SELECTOR, "a[href^='#rec-']")
            assert rows and len(links) == len(rows)
        hrefs = {a.get_attribute("href").split("#")[1]
                 for a in driver.find_elements(By.CSS_SELECTOR, "a[href^='#rec-']")}  # fmt: skip
        for anchor in hrefs:
            assert driver.find_elements(By.ID, anchor), anchor
        # the highlighted tokens of a view are the record's trained tokens in the shards
        sections = driver.find_elements(By.CSS_SELECTOR, "section.record")
        compared = 0
        for section in sections[:40]:
            rid = section.find_element(By.TAG_NAME, "h3").text.split(" (")[0]
            if section.find_elements(By.CSS_SELECTOR, "p.fail"):
                continue  # refused: not in the shards
            first = section.find_element(By.CSS_SELECTOR, "pre.tokens")
            shown = len(first.find_elements(By.CSS_SELECTOR, "span.tok.trained"))
            assert shown == _shard_trained(tmp_path / "shards", rid), rid
            assert first.find_elements(By.CSS_SELECTOR, "span.tok.stop"), rid  # its stop marked
            compared += 1
        assert compared >= 20
        shot = tmp_path / "audit-page.png"
        driver.get((tmp_path / "page.html").as_uri() + "#check-near_duplicates")
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
        artifacts = os.environ.get("SFTPIPE_TEST_ARTIFACTS")
        if artifacts:
            Path(artifacts).mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, Path(artifacts) / shot.name)
    finally:
        driver.quit()
