"""Package layout: the repository keeps the design card's folders (shared/, services/) while
the installed import names are specific to the project:

    shared/            -> selfreward            (the library every service imports)
    services/<name>/   -> selfreward.services.<name>

pyproject.toml holds the metadata; this file only computes the package list for that mapping.
"""

from setuptools import find_packages, setup

packages = ["selfreward", "selfreward.services"]
packages += [f"selfreward.{p}" for p in find_packages("shared")]
packages += [f"selfreward.services.{p}" for p in find_packages("services")]

setup(
    packages=packages,
    package_dir={"selfreward": "shared", "selfreward.services": "services"},
    package_data={
        "selfreward": ["py.typed", "data/demo/*.jsonl", "prompts/templates/*.txt", "configs/*.yaml"],
        "selfreward.services": ["*/accelerate/*.yaml"],
    },
    include_package_data=True,
)
