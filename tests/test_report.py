"""The run report: its figures and configuration table (esmshard.report), the real
`snakemake --report` page after a run opened in a headless Chromium, and the rank logs'
progress lines (done/total, residues/s, ETA) that give the details behind the per-rank figure."""

import os
import re
import shutil
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from conftest import random_sequences, run_snakemake, write_fasta
from esmshard.report import check_vectors, config_table, rank_outcomes, rank_throughput, sequences_embedded

pytestmark = pytest.mark.workflow  # runs the real snakemake: not in make test-fast

PLOTS = {  # report category -> the PNG shown there
    "Input": "results/report/sequence_lengths.png",
    "Ranks": "results/report/rank_throughput.png",
    "Output": "results/report/sequences_embedded.png",
    "Vectors": "results/report/vectors.png",
}
PROGRESS_SECONDS = 1  # the rank logs' interval in the workflow run below


def ok_status(rank, seconds=2.0, rate=1000.0, sequences=10, gpu=None):
    return {
        "rank": rank,
        "ok": True,
        "attempt": 1,
        "host": "node1",
        "gpu": gpu,
        "sequences": sequences,
        "residues": int(rate * seconds),
        "seconds": seconds,
        "residues_per_second": rate,
    }


def failed_status(rank):
    return {"rank": rank, "ok": False, "attempt": 2, "error": "RuntimeError: CUDA out of memory"}


def manifest_for(failed: dict[int, tuple[str, list[str]]], sequences=30, embedded=20) -> dict:
    return {
        "complete": not failed,
        "world_size": 3,
        "sequences": sequences,
        "embedded": embedded,
        "missing": sequences - embedded,
        "ranks_failed": [{"rank": r, "error": error, "missing_ids": ids} for r, (error, ids) in failed.items()],
    }


def figure_texts(figure) -> list[str]:
    return [t.get_text() for t in figure.texts] + [t.get_text() for axes in figure.axes for t in axes.texts]


def test_a_failed_rank_is_drawn_as_failed_with_its_error():
    missing = [f"s{i}" for i in range(10)]
    statuses = [ok_status(0, gpu="0"), failed_status(1), ok_status(2, gpu="1")]
    outcomes = rank_outcomes(statuses, manifest_for({1: ("RuntimeError: CUDA out of memory", missing)}))
    assert [(o.rank, o.ok, o.device, o.embedded, o.missing) for o in outcomes] == [
        (0, True, "GPU 0", 10, 0),
        (1, False, "", 0, 10),
        (2, True, "GPU 1", 10, 0),
    ]
    assert outcomes[1].seconds is None and outcomes[1].residues_per_second is None

    texts = figure_texts(rank_throughput(outcomes))
    assert texts.count("failed") == 2  # in both panels, at rank 1
    assert "rank 1 failed: RuntimeError: CUDA out of memory" in texts
    assert (
        "20 of 30 sequences embedded; 10 missing"
        in sequences_embedded(outcomes, manifest_for({1: ("x", missing)})).axes[0].get_title()
    )


def test_a_shard_the_aggregation_rejected_counts_as_failed_although_its_status_says_ok():
    manifest = manifest_for({0: ("shard results/shards/shard_0.h5 is unreadable", ["a", "b"])})
    (outcome,) = rank_outcomes([ok_status(0)], manifest)
    assert not outcome.ok and outcome.error.startswith("shard") and outcome.missing == 2
    assert outcome.seconds is None


def test_config_table_shows_every_value_escaped_and_the_resolved_world_size():
    page = config_table({"model": "<m>.pt", "world_size": None, "fasta": ["a.fa"], "timeout": None}, 4)
    assert "<th>model</th><td>&lt;m&gt;.pt</td>" in page
    assert "<th>world_size</th><td>null (one rank per visible GPU: 4)</td>" in page
    assert "<th>fasta</th><td>[&quot;a.fa&quot;]</td>" in page and "<th>timeout</th><td>null</td>" in page
    assert "random-weights" not in page


@pytest.fixture(scope="module")
def report_run(tmp_path_factory, tiny_checkpoint):
    """Two ranks of which rank 1 fails (no retry), enough work for rank 0 to log progress a few
    times (small batches, so that a batch ends soon after each interval even on a busy machine;
    one thread, as two threads on two busy cores ran 10x slower); then `snakemake --report`."""
    workdir = tmp_path_factory.mktemp("report")
    fasta = write_fasta(workdir / "proteins.fasta", random_sequences(4000, seed=5, median=120))
    config = {
        "fasta": [str(fasta)],
        "model": str(tiny_checkpoint),
        "world_size": 2,
        "progress_seconds": PROGRESS_SECONDS,
        "tokens_per_batch": 2048,
        "threads_per_rank": 1,
    }
    result = run_snakemake(workdir, config, env={"ESMSHARD_FAIL_RANKS": "1"}, targets=())
    assert result.returncode == 0, result.stderr[-3000:]
    report = run_snakemake(workdir, config, "--report", str(workdir / "report.html"), targets=())
    assert report.returncode == 0, report.stderr[-3000:]
    return workdir


def test_vectors_of_a_broken_checkpoint_are_named_and_sound_ones_pass():
    rng = np.random.default_rng(0)
    sound = rng.normal(size=(300, 32))
    assert check_vectors(sound, "mean/layer_2").problems() == []
    same = np.tile(rng.normal(size=32), (300, 1)) + 1e-7 * rng.normal(size=(300, 32))  # ignores its input
    problems = check_vectors(same, "mean/layer_2").problems()
    assert problems == [
        "100% of 300 sampled distinct sequences have a near-identical vector (cosine > 0.9999)",
        f"the vectors' norms have collapsed to one value (spread {check_vectors(same, 'x').norm_spread:.1e})",
    ]
    sound[[3, 7]] = np.nan
    assert check_vectors(sound, "mean/layer_2").problems() == ["2 of 300 sampled sequences have non-finite values"]


def test_a_normal_run_makes_the_report_files(report_run):
    for path in [*PLOTS.values(), "results/report/config.html"]:
        assert (report_run / path).stat().st_size > 0, path
    assert (report_run / "results/report/rank_throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log = (report_run / "logs/report_plots.log").read_text()
    assert "report figures for 2 ranks (failed: 1)" in log and "look broken" not in log
    # the tests' model has random weights: the report's configuration says so before anything else
    config = (report_run / "results/report/config.html").read_text()
    assert "<p id='random-weights'" in config and "has RANDOM weights" in config
    assert config.index("random-weights") < config.index("Configuration used")


def test_rank_log_shows_progress_with_eta_at_a_steady_interval(report_run):
    progress = re.compile(
        r"^(\S+ \S+) INFO rank 0: (\d+)/(\d+) sequences \(([\d.]+)%\), .* (\d+) residues/s, "
        r"elapsed \S+, ETA (\d+:\d\d:\d\d)$",
        re.M,
    )
    lines = progress.findall((report_run / "logs/embed/rank_0.log").read_text())
    assert len(lines) >= 3, lines  # at least two lines on the interval, then the final one
    *on_interval, final = lines
    assert final[1] == final[2] and final[3] == "100.0" and final[5] == "0:00:00"
    done = [int(line[1]) for line in lines]
    assert done == sorted(done) and all(0 < int(line[1]) < int(line[2]) for line in on_interval)
    # Lines are written at the first batch's end after each interval, so mostly 1-2 s apart.
    # No upper bound on every gap: on a busy machine one batch may take a few seconds.
    times = [datetime.strptime(line[0], "%Y-%m-%d %H:%M:%S.%f") for line in on_interval]
    gaps = sorted((later - earlier).total_seconds() for earlier, later in zip(times, times[1:]))
    assert gaps[0] >= PROGRESS_SECONDS and gaps[len(gaps) // 2] <= PROGRESS_SECONDS + 1, gaps


def find_browser() -> tuple[str, str]:
    """Chromium and its driver (Debian's chromium and chromium-driver); CI must have them."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        reason = "needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(f"CI: the report's browser test {reason}; .ci/run installs them")
        pytest.skip(f"the report's browser test {reason}")
    return chromium, driver


@pytest.fixture(scope="module")
def browser():
    chromium, driver_path = find_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "SEVERE"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    yield driver
    driver.quit()


def open_category(browser, report: Path, category: str):
    """Load the report and click the category's entry in the menu, as a reader would."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(report.as_uri())
    menu_entry = (By.XPATH, f"//a[span[text()='{category}']]")  # the description's links have no span
    WebDriverWait(browser, 30).until(lambda b: b.find_elements(*menu_entry))
    click_when_still(browser, menu_entry)
    view = (By.XPATH, "//tbody//a[@iconname='eye']")  # the result's view button
    WebDriverWait(browser, 10).until(lambda b: b.find_elements(*view))
    buttons = browser.find_elements(*view)
    assert len(buttons) == 1, f"{category}: {len(buttons)} results"
    click_when_still(browser, view)


def click_when_still(browser, locator):
    """Click the element once nothing lies over it: the report's menu animates (on a busy machine
    a click can land on the entry sliding past), so a click that another element would receive is
    tried again, up to 10 s."""
    from selenium.common.exceptions import ElementClickInterceptedException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(
        browser, 10, ignored_exceptions=(ElementClickInterceptedException, StaleElementReferenceException)
    ).until(lambda b: b.find_element(*locator).click() or True)


def test_report_page_shows_the_plots_and_the_config_in_a_real_browser(browser, report_run, tiny_checkpoint):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    report = report_run / "report.html"
    browser.get(report.as_uri())
    WebDriverWait(browser, 30).until(lambda b: "esmshard embedded the protein sequences" in b.page_source)
    assert browser.execute_script("return Object.keys(categories).sort()") == [
        "Configuration",
        "Input",
        "Output",
        "Ranks",
        "Vectors",
    ]

    for category, path in PLOTS.items():
        open_category(browser, report, category)
        image = WebDriverWait(browser, 10).until(
            lambda b: b.execute_script(
                "const img = document.querySelector('img[src^=\"data:image/png\"]');"
                "return img && img.complete && img.naturalWidth > 0 ? img : null;"
            )
        )
        assert image.get_attribute("src") == browser.execute_script(f"return results['{path}'].data_uri")
        width, height = browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", image)
        assert width > 400 and height > 250, (category, width, height)
        assert image.is_displayed()
    assert "1022" in browser.execute_script(f"return results['{PLOTS['Input']}'].caption")
    assert "failed" in browser.execute_script(f"return results['{PLOTS['Ranks']}'].caption")

    open_category(browser, report, "Configuration")
    frame = WebDriverWait(browser, 10).until(
        lambda b: b.find_elements(By.CSS_SELECTOR, "iframe[src^='data:text/html']")
    )[0]
    browser.switch_to.frame(frame)
    try:
        rows = {
            row.find_element(By.TAG_NAME, "th").text: row.find_element(By.TAG_NAME, "td").text
            for row in WebDriverWait(browser, 10).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#config tr"))
        }
    finally:
        browser.switch_to.default_content()
    assert rows["model"] == str(tiny_checkpoint) and rows["world_size"] == "2" and rows["precision"] == "auto"
    assert "threads_per_rank" not in rows  # the settings that shaped the numbers, not how the jobs ran
    assert rows["engine"] == "packed" and rows["long_sequences"] == "truncate"  # defaults
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert not errors, errors
