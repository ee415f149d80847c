"""pyproject.toml holds the project's metadata; this file only says which packages the wheel carries,
because pyproject cannot add a package from another directory to the ones it finds: conf/ stays at the
repository's top level (where users look for it) and ships as the package ``train.conf``, which
``train/__main__.py`` reads in an installed copy."""

from setuptools import find_namespace_packages, find_packages, setup

CONF = ["train.conf", *(f"train.conf.{group}" for group in find_namespace_packages(where="conf"))]

setup(
    packages=[*find_packages(include=["msa*", "kernels*", "train*"]), *CONF],
    package_dir={"train.conf": "conf"},
    package_data={package: ["*.yaml"] for package in CONF},
)
