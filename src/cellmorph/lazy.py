"""PEP 562 lazy exports: a package's public names load their owner modules on first use, so that importing the
package (``cellmorph``, ``cellmorph.cv``) does not load torch or pandas."""

from __future__ import annotations

from importlib import import_module


def lazy_exports(package: str, namespace: dict, exports: dict[str, str]):
    """``(__getattr__, __dir__)`` for the package ``package`` whose globals are ``namespace``: each name of
    ``exports`` (name → owner module) is imported from its owner when first asked for, then kept."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(exports[name]), name)
        namespace[name] = value  # once loaded, a plain attribute
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
