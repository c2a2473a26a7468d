"""The visual report: PNG panels and one self-contained HTML file, checked in a real browser."""

import re
import shutil
import struct

import pytest
import torch
from torch import nn

import gradscope
from gradscope import demo

pytest.importorskip("matplotlib", reason="needs the viz extra")
from gradscope.outputs import html_page, visual

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_SIGNATURE
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def nan_run(tmp_path_factory):
    directory = tmp_path_factory.mktemp("nan")
    mon = demo.run("nan", 120, log_dir=directory / "log")
    return mon, gradscope.load_run(directory / "log")


def test_png_from_a_monitor_and_from_its_log(nan_run, tmp_path):
    mon, run = nan_run
    for name, source in (("live", mon), ("loaded", run)):
        path = tmp_path / f"{name}.png"
        visual.write_png(source, path)
        width, height = png_size(path.read_bytes())
        assert width == 1100 and height > 1500  # five stacked panels at 100 dpi


def test_every_panel_draws_the_run(nan_run):
    mon, _ = nan_run
    data = visual.RunData.of(mon)
    assert data.rms.shape == (120, len(mon.rows))
    assert data.report.first_nonfinite == (60, "blocks.4.linear")
    # The layers named by findings come first in what is highlighted and drawn as ridges.
    assert data.rows[data.named_layers()[0]] == "blocks.4.linear"
    assert data.rows[visual.ridge_layers(data)[0]] == "blocks.4.linear"
    for panel in visual.PANELS:
        fig = visual.figure(data, panel)
        assert fig.axes, panel
    with pytest.raises(ValueError, match="unknown panel 'pie'"):
        visual.figure(data, "pie")


def test_html_is_self_contained_and_lists_every_finding(nan_run):
    _mon, run = nan_run
    text = html_page.html_report(run, title="a run")
    assert text.count('<tr class="finding">') == len(run.report().findings) > 0
    assert "<script" not in text.lower()
    assert not re.search(r"(?:src|href)=\"(?!data:)", text), "every image is inlined"
    without_images = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", text)
    assert not re.search(r"https?:|//[a-z]", without_images), "no network address"
    assert "default-src 'none'" in text  # the browser itself refuses any fetch
    assert text.count('src="data:image/png;base64,') == len(visual.PANELS)
    assert "blocks.4.linear" in text


class Evil(nn.Module):
    def __init__(self):
        super().__init__()
        self.add_module("<img src=x onerror=alert(1)>", nn.Linear(3, 3))
        self.add_module("a&b", nn.Linear(3, 1))

    def forward(self, x):
        return self.get_submodule("a&b")(self.get_submodule("<img src=x onerror=alert(1)>")(x))


def test_layer_names_are_escaped():
    model = Evil()
    with gradscope.watch(model) as mon:
        for _ in range(3):
            loss = model(torch.randn(4, 3)).pow(2).mean()
            loss.backward()
            mon.step(loss=loss)
    text = html_page.html_report(mon)
    assert "<img src=x" not in text
    assert "&lt;img src=x onerror=alert(1)&gt;" in text and "a&amp;b" in text


def test_a_run_without_steps_still_renders(tmp_path):
    mon = gradscope.watch(nn.Linear(2, 2))
    mon.close()
    visual.write_png(mon, tmp_path / "empty.png")
    assert "No findings" in html_page.html_report(mon)


def _browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("needs Chromium and its driver (Debian packages chromium, chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (the dev extra)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=options)


def test_html_in_a_headless_browser(nan_run, tmp_path):
    mon, _ = nan_run
    path = tmp_path / "report.html"
    html_page.write_html(mon, path, title="nan demo")
    browser = _browser()
    try:
        browser.get(path.as_uri())
        assert browser.title == "nan demo"
        errors = [entry for entry in browser.get_log("browser") if entry["level"] in ("SEVERE", "ERROR")]
        assert errors == []
        rows = browser.find_elements("css selector", "#findings tbody tr.finding")
        assert len(rows) == len(mon.report().findings)
        assert any("nonfinite" in row.text and "blocks.4.linear" in row.text for row in rows)
        images = browser.find_elements("tag name", "img")
        assert len(images) == len(visual.PANELS)
        for image in images:
            assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image) == 1100
    finally:
        browser.quit()
