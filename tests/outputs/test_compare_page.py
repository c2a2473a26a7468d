"""The comparison's HTML page: self-contained, every layer, every name escaped."""

import re

import numpy as np
import torch
from compared_runs import logged_run

import gradscope
from gradscope.outputs.compare_page import html_comparison, write_html


def test_the_page_lists_every_layer_and_escapes_names(tmp_path):
    model = torch.nn.Sequential()
    model.add_module("<b>in</b>", torch.nn.Linear(6, 8))
    model.add_module("act", torch.nn.ReLU())
    model.add_module("out", torch.nn.Linear(8, 3))
    a = logged_run(tmp_path / "a", model=model, tags={"note": "<script>x</script>"})
    torch.manual_seed(1)
    b = logged_run(tmp_path / "b", seed=1)
    cmp = gradscope.compare(a, b)
    page = html_comparison(cmp)
    assert "<script>" not in page and "&lt;script&gt;x&lt;/script&gt;" in page
    assert "<td>&lt;b&gt;in&lt;/b&gt;</td>" not in page  # not in every run: left out, and said so
    assert "comparing the 0 layers they all have" in page
    write_html(gradscope.compare(b, logged_run(tmp_path / "c", seed=2)), tmp_path / "c.html")
    written = (tmp_path / "c.html").read_text()
    for layer in ("0", "2", "4"):
        assert f"<tr><td>{layer}</td>" in written
    assert "default-src 'none'" in written and "<img" not in written


def test_each_layer_has_one_line_per_run_over_the_shared_steps(tmp_path):
    runs = [logged_run(tmp_path / name, seed=seed) for name, seed in (("a", 0), ("b", 1), ("c", 2))]
    cmp = gradscope.compare(*runs)
    page = html_comparison(cmp)
    plots = re.findall(r'<svg class="steps".*?</svg>', page)
    assert len(plots) == len(cmp.rows) and all(p.count("<polyline") == 3 for p in plots)
    steps = cmp.layers.steps
    for plot, r in zip(plots, range(len(cmp.rows)), strict=True):
        first_line = re.search(r'points="([^"]*)"', plot).group(1).split()
        assert len(first_line) == len(steps)  # one point per shared step (norms finite here)
        ys = [float(p.split(",")[1]) for p in first_line]
        logs = [float(v) for v in np.log10(cmp.layers.norms[0, :, r])]
        # higher norm, higher on the page (smaller y): the order of the points matches the norms'
        order_y = sorted(range(len(ys)), key=lambda i: -ys[i])
        order_norm = sorted(range(len(logs)), key=lambda i: logs[i])
        assert order_y == order_norm or len(set(logs)) < len(logs)
