"""The visual report: PNG panels and one self-contained HTML file, checked in a real browser."""

import dataclasses
import itertools
import re
import shutil
import struct

import pytest
import torch
from torch import nn

import gradscope
from gradscope import demo
from gradscope.health.findings import Finding

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


def drawn_texts(fig) -> list[tuple[str, object]]:
    """Every text drawn on ``fig``'s axes as ``(text, display box)``: annotations (with their
    frames), titles, axis labels, the tick labels in view; each legend as one box."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.transforms import Bbox

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    texts = []
    for ax in fig.axes:
        candidates = [*ax.texts, ax.title]
        for axis, index in ((ax.xaxis, 0), (ax.yaxis, 1)):
            if axis.get_visible():  # a twin's shared axis is not drawn
                low, high = sorted(axis.get_view_interval())
                ticks = [t for t in axis.get_ticklabels() if low <= t.get_position()[index] <= high]
                candidates += [axis.label, *ticks]
        for text in candidates:
            if text.get_visible() and text.get_text():
                box = text.get_window_extent(renderer)
                if text.get_bbox_patch() is not None:  # the frame drawn around it
                    box = Bbox.union([box, text.get_bbox_patch().get_window_extent(renderer)])
                texts.append((text.get_text(), box))
        if ax.get_legend() is not None:
            texts.append(("legend", ax.get_legend().get_window_extent(renderer)))
    texts += [("figure legend", legend.get_window_extent(renderer)) for legend in fig.legends]
    return texts


def test_findings_at_nearby_steps_are_labelled_without_overlap(nan_run, tmp_path):
    """Many findings within a few steps (and an action among them): no label of the loss panel
    overlaps another, and every finding is listed."""
    _, run = nan_run
    layers = [f"blocks.{i}.linear" for i in range(6)]
    crowded = [
        Finding("nonfinite", "critical", layers[4], 60, 60, "m", "s"),
        Finding("divergence", "critical", None, 61, 61, "m", "s"),
        Finding("exploding", "warning", layers[3], 62, 62, "m", "s"),
        Finding("exploding", "warning", layers[2], 63, 63, "m", "s"),
        Finding("vanishing", "warning", layers[0], 64, 64, "m", "s"),
        Finding("dead", "warning", layers[5], 66, 66, "m", "s"),
        Finding("dead", "warning", layers[1], 69, 69, "m", "s"),
        Finding("stalled_updates", "warning", layers[1], 72, 72, "m", "s"),
        Finding("plateau", "info", None, 75, 75, "m", "s"),
        Finding("underfitting", "info", None, 5, 5, "m", "s"),
    ]
    action = {"step": 61, "action": "lr", "message": "lr 0.01 -> 0.005", "detail": {"scale": 0.5, "old_scale": 1.0}}
    report = dataclasses.replace(run.report(), findings=tuple(crowded), actions=(action,))
    data = visual.RunData.of(run, report)
    fig = visual.figure(data, "loss")
    texts = drawn_texts(fig)
    overlapping = [(a[0], b[0]) for a, b in itertools.combinations(texts, 2) if a[1].overlaps(b[1])]
    assert overlapping == []
    (listed,) = fig.legends
    entries = [t.get_text() for t in listed.get_texts()]
    numbers = [t.get_text() for t in fig.axes[0].texts if t.get_text().isdigit()]
    assert numbers == [str(i) for i in range(1, len(entries) + 1)]  # one numbered marker per entry
    assert [entry.split(":")[0] for entry in entries] == numbers
    spans = []  # (first step, last step, what) of each entry: "2: steps 60-63: nonfinite (...); divergence"
    for entry in entries:
        first, last, what = re.fullmatch(r"\d+: steps? (\d+)(?:-(\d+))?: (.+)", entry, re.S).groups()
        spans.append((int(first), int(last or first), what))
    for finding in crowded:  # the entry covering its step names its kind (and its layer, or a count of layers)
        assert any(first <= finding.since_step <= last and finding.kind in what for first, last, what in spans)
    visual.write_png(run, tmp_path / "crowded.png", report=report)  # the same panel among the others
    assert png_size((tmp_path / "crowded.png").read_bytes())[0] == 1100


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
