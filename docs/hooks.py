"""mkdocs hooks (mkdocs.yml ``hooks:``).

Publish ``benchmarks/results/*.json`` with the site. The pages link the results as the
repository lays them out (``../benchmarks/results/x.json`` from ``docs/performance.md``), so the
links work where the Markdown is read in the repository. The site has nothing above ``docs/``:
the files are added to it at ``benchmarks/results/`` and those links lose one ``../``, so a
broken one still fails ``mkdocs build --strict``.

Render the Sphinx roles of gradscope's docstrings (``:class:`~gradscope.Monitor```), which
mkdocstrings leaves as text, as cross-references: a link where the API pages document the
name, the name in code where they do not.
"""

import re
from pathlib import Path

from mkdocs.structure.files import File

REPO = Path(__file__).resolve().parents[1]
RESULTS = "benchmarks/results"
LINK = re.compile(r"\]\(\.\./((?:\.\./)*)" + re.escape(RESULTS) + "/")
# A role as it reaches the page's HTML: the role's name, then its target as inline code.
ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|exc|obj):<code>(~?)([\w.]+)(\(\))?</code>")


def on_files(files, config):
    for path in sorted((REPO / RESULTS).glob("*.json")):
        files.append(File(f"{RESULTS}/{path.name}", str(REPO), config["site_dir"], config["use_directory_urls"]))
    return files


def on_page_markdown(markdown, page, config, files):
    return LINK.sub(lambda m: f"]({m.group(1)}{RESULTS}/", markdown)


def _role(match: re.Match) -> str:
    short, target, call = match.groups()
    title = (target.rsplit(".", 1)[-1] if short else target) + (call or "")
    # mkdocs-autorefs resolves this after every page is rendered; "optional": no warning where
    # no page documents the target (a private helper), the title stays as code.
    return f'<autoref identifier="{target}" optional><code>{title}</code></autoref>'


def on_page_content(html, page, config, files):
    return ROLE.sub(_role, html)
