"""Where ``gradscope.kernels`` comes from: the package when installed, ``kernels/`` in a checkout.

The Triton sources live in the repository's top-level ``kernels/`` folder, which setuptools
installs as the subpackage ``gradscope.kernels`` (``package-dir`` in ``pyproject.toml``).
That folder has no ``__init__.py`` on purpose. Python's path finder takes a folder without
one for a *namespace portion*, and any regular package of the same name anywhere on
``sys.path`` wins over it. So with the repository root first on ``sys.path`` (a REPL, a
notebook, ``python -c``, ``python -m pytest`` run there), ``import kernels`` still finds
Hugging Face's ``kernels`` distribution (which ``transformers`` needs) instead of our folder.
A regular package there would shadow it and break ``transformers``.

Installed from a wheel, the folder is ``gradscope/kernels/`` and the usual import finds it.
In a source checkout (an editable install, or the repository root on ``sys.path``), the
package ``gradscope`` is the checkout's ``gradscope/`` folder, which has no ``kernels``
inside. setuptools' editable finder cannot map a subpackage without ``__init__.py`` either.
For that case :func:`install` adds one small finder that resolves exactly the name
``gradscope.kernels`` to the checkout's ``kernels/`` folder. Nothing is imported from it
until a Triton backend is used, so ``import gradscope`` never needs Triton.
"""

from __future__ import annotations

import sys
from importlib.machinery import ModuleSpec, PathFinder
from pathlib import Path

NAME = "gradscope.kernels"
"""The import name of the kernels' package."""


class CheckoutKernelsFinder:
    """A meta-path finder for :data:`NAME` alone: the checkout's ``kernels/`` folder.

    Args:
        root: the checkout's root, the folder holding ``gradscope/`` and ``kernels/``.
    """

    def __init__(self, root: Path):
        self.root = root

    def find_spec(self, fullname: str, path=None, target=None) -> ModuleSpec | None:
        if fullname != NAME:
            return None
        # The path finder, asked for "gradscope.kernels" in the root, looks for a "kernels"
        # entry there: a namespace spec whose search path is root/kernels.
        return PathFinder.find_spec(fullname, [str(self.root)])

    def __eq__(self, other) -> bool:  # one finder per root, however often gradscope is reloaded
        return isinstance(other, CheckoutKernelsFinder) and other.root == self.root

    def __hash__(self) -> int:
        return hash(self.root)


def checkout_root(package_dir: Path) -> Path | None:
    """The checkout root if ``package_dir`` (gradscope's folder) is a source checkout's.

    That is: ``package_dir`` holds no ``kernels`` folder of its own and its parent holds one
    with the kernel sources. ``None`` for an installed package.
    """
    if (package_dir / "kernels").is_dir():
        return None
    root = package_dir.parent
    return root if (root / "kernels" / "launch.py").is_file() else None


def install(package_dir: Path) -> None:
    """Make ``gradscope.kernels`` importable from a source checkout (no-op when installed)."""
    root = checkout_root(package_dir)
    if root is None:
        return
    finder = CheckoutKernelsFinder(root)
    if finder not in sys.meta_path:
        # After the path finder: an installed gradscope.kernels found the usual way comes first.
        sys.meta_path.append(finder)
