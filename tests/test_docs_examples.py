"""Every ``python`` block of README.md and docs/**/*.md runs, so a stale example fails CI.

The blocks of one page run in order in one namespace (a page sets up a model once and its
later blocks use it), in a fresh temporary working directory. A block that cannot run here
(it needs a GPU, several processes, the network, a long training run) carries the marker
``<!-- not-run: REASON -->`` on the line before its fence: it is compiled, not run, and
reported. docs/writing-docs.md documents the rules for authors.
"""

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import gradscope

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([^\s`]*)")
MARKER = re.compile(r"^<!--\s*not-run:\s*(.*?)\s*-->$")
LOOKS_LIKE_MARKER = re.compile(r"<!--\s*not[\s_-]*run", re.I)
# An example that needs an optional extra the environment lacks is skipped, not failed ([dev] has all).
EXTRAS = {"lightning", "pytorch_lightning", "transformers", "accelerate", "wandb", "mlflow", "tensorboard"}
EXTRAS |= {"matplotlib", "numba"}


@dataclass(frozen=True)
class Block:
    page: str  # relative to the repository root
    line: int  # 1-based line of the first line of code
    code: str
    not_run: str | None  # the marker's reason; None for a block that runs


def parse(path: Path, root: Path = REPO) -> list[Block]:
    """The ``python`` blocks of one Markdown page; raises ValueError on a malformed marker."""
    page = path.relative_to(root).as_posix()
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    marker: tuple[int, str] | None = None  # (line, reason) of a marker waiting for its block
    i = 0
    while i < len(lines):
        line = lines[i]
        fence = FENCE.match(line)
        if fence is None:
            stripped = line.strip()
            if LOOKS_LIKE_MARKER.search(stripped):
                found = MARKER.match(stripped)
                if found is None or not found.group(1):
                    raise ValueError(f"{page}:{i + 1}: write the marker as <!-- not-run: REASON -->: {stripped}")
                marker = (i + 1, found.group(1))
            elif stripped and marker is not None:
                raise ValueError(f"{page}:{marker[0]}: a not-run marker must be right before a python block")
            i += 1
            continue
        ticks, info = fence.group(1), fence.group(2).lower()
        end = i + 1  # the closing fence: the same character, at least as long, nothing after it
        while end < len(lines) and not re.match(rf"^ {{0,3}}{ticks[0]}{{{len(ticks)},}}\s*$", lines[end]):
            end += 1
        if info == "python":
            reason = marker[1] if marker else None
            blocks.append(Block(page, i + 2, "\n".join(lines[i + 1 : end]) + "\n", reason))
        elif marker is not None:
            raise ValueError(f"{page}:{marker[0]}: a not-run marker must be right before a python block, not {info!r}")
        marker = None
        i = end + 1
    if marker is not None:
        raise ValueError(f"{page}:{marker[0]}: a not-run marker must be right before a python block")
    return blocks


BLOCKS = {path.relative_to(REPO).as_posix(): parse(path) for path in PAGES}
RUNNABLE = [page for page, blocks in BLOCKS.items() if any(b.not_run is None for b in blocks)]


def compiled(block: Block):
    # Blank lines first, so that tracebacks name the Markdown file's own line numbers.
    return compile("\n" * (block.line - 1) + block.code, str(REPO / block.page), "exec")


def test_every_page_with_python_runs_some_and_says_why_not_the_rest():
    assert RUNNABLE, "no docs page has a runnable python block"
    print(f"{'page':40} run  not run")
    for page, blocks in BLOCKS.items():
        if not blocks:
            continue
        skipped = [b for b in blocks if b.not_run is not None]
        print(f"{page:40} {len(blocks) - len(skipped):3}  {len(skipped):3}")
        for block in skipped:
            print(f"    {page}:{block.line}: not run: {block.not_run}")
        assert len(skipped) < len(blocks), f"{page}: every python block is marked not-run"
        for block in skipped:
            assert block.not_run.strip(), f"{page}:{block.line}: a not-run marker needs a reason"
            compiled(block)  # not run, but it must still be Python


@pytest.mark.parametrize(
    ("marked", "message"),
    [
        ("<!-- not-run: needs 2 GPUs -->\n```python\nx = 1\n```\n", None),
        ("<!-- not-run: -->\n```python\nx = 1\n```\n", "write the marker as"),
        ("<!-- not run: a typo -->\n```python\nx = 1\n```\n", "write the marker as"),
        ("<!-- not-run: why -->\n\nsome text\n```python\nx = 1\n```\n", "right before a python block"),
        ("<!-- not-run: why -->\n```bash\nls\n```\n", "right before a python block"),
        ("````markdown\n<!-- not-run: shown, not parsed -->\n```python\nx = 1\n```\n````\n", None),
    ],
)
def test_the_marker_parser(tmp_path, marked, message):
    path = tmp_path / "page.md"
    path.write_text(marked)
    if message is None:
        blocks = parse(path, root=tmp_path)
        assert [b.not_run for b in blocks] == (["needs 2 GPUs"] if "GPUs" in marked else [])
    else:
        with pytest.raises(ValueError, match=message):
            parse(path, root=tmp_path)


@pytest.mark.parametrize("page", RUNNABLE)
def test_page_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs/, lightning_logs/, out/, wandb/, mlflow.db land here
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("WANDB_MODE", "offline")  # never the network, whatever a block says
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    if "wandb" in sys.modules:
        sys.modules["wandb"].teardown()  # W&B keeps its first run's settings (its directory) per process
    if "mlflow" in sys.modules:
        # A tracking URI an earlier test set in this process (mlflow.set_tracking_uri, e.g. by
        # Lightning's MLFlowLogger) wins over MLFLOW_TRACKING_URI: as in a fresh process, none.
        from mlflow.tracking._tracking_service import utils as mlflow_tracking

        monkeypatch.setattr(mlflow_tracking, "_tracking_uri", None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    namespace: dict = {"__name__": "__docs_example__"}
    ran = 0
    try:
        for block in BLOCKS[page]:
            if block.not_run is not None:
                continue
            try:
                exec(compiled(block), namespace)
            except ModuleNotFoundError as error:
                if error.name and error.name.split(".")[0] in EXTRAS:
                    pytest.skip(f"{page}:{block.line} needs {error.name}, an optional extra")
                raise
            ran += 1
    finally:
        torch.set_num_threads(threads)
        for value in list(namespace.values()):
            if isinstance(value, gradscope.Monitor):
                value.close()  # idempotent: a page may leave its last monitor open
        if "wandb" in sys.modules and sys.modules["wandb"].run is not None:
            sys.modules["wandb"].run.finish()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    skipped = sum(b.not_run is not None for b in BLOCKS[page])
    print(f"{page}: {ran} blocks run, {skipped} not run")
    assert ran > 0
    assert os.getcwd() == str(tmp_path), "an example changed the working directory"
