"""Disk size of a CPU-only core install of gradscope: ``pip install torch==X gradscope``.

For each source (a git revision, or the working tree), builds gradscope's wheel, installs it
with the pinned torch and its core requirements (no extras) into a new virtual environment,
and measures what landed: the venv's size, the size of each distribution, and whether Triton
came with it. ``python benchmarks/install_size.py [--rev HEAD~1] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import shutil
import subprocess
import sys
import tempfile
import venv
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def build_wheel(rev: str | None, work: Path) -> Path:
    source = work / "source"
    if rev is None:
        source.mkdir()
        for name in ("pyproject.toml", "README.md"):
            shutil.copy(ROOT / name, source / name)
        for name in ("gradscope", "kernels"):
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    else:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(source), rev], check=True)
    try:
        out = work / "wheel"
        command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out)]
        subprocess.run([*command, str(source)], check=True)
        return next(out.glob("*.whl"))
    finally:
        if rev is not None:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(source)], check=True)


def measure(rev: str | None, torch_pin: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        wheel = build_wheel(rev, work)
        env = work / "venv"
        venv.create(env, with_pip=True)
        python = env / "bin" / "python"
        subprocess.run([str(python), "-m", "pip", "install", "-q", torch_pin, str(wheel)], check=True)
        (site,) = env.glob("lib/python3*/site-packages")
        dists = {}
        for dist in importlib.metadata.distributions(path=[str(site)]):
            files = [Path(dist.locate_file(f)) for f in dist.files or []]
            dists[dist.metadata["Name"]] = sum(f.stat().st_size for f in files if f.is_file())
        return {
            "source": rev or "working tree",
            "venv_bytes": folder_bytes(env),
            "site_packages_bytes": folder_bytes(site),
            "triton_installed": any(name.lower() == "triton" for name in dists),
            "distributions": dict(sorted(dists.items(), key=lambda kv: -kv[1])),
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rev", action="append", default=[], help="git revision(s) to measure besides the tree")
    parser.add_argument("--torch", default="torch==2.13.0", help="the torch requirement installed beside it")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    results = [measure(rev, args.torch) for rev in args.rev] + [measure(None, args.torch)]
    print(f"{'source':<16} {'venv MB':>8} {'site-packages MB':>17} {'triton':>6}  largest")
    for r in results:
        largest = ", ".join(f"{n} {b / 1e6:.0f} MB" for n, b in list(r["distributions"].items())[:3])
        print(
            f"{r['source']:<16} {r['venv_bytes'] / 1e6:>8.0f} {r['site_packages_bytes'] / 1e6:>17.0f} "
            f"{r['triton_installed']!s:>6}  {largest}"
        )
    if args.json:
        meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "python": sys.version.split()[0]}
        meta["commit"] = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
