"""setuptools' package list: every package under dgst_monai/, found, plus the two shipped folders.

``pyproject.toml`` holds everything else; it maps ``bundles/`` and ``data_manifests/`` onto the package names
``dgst_monai.bundles`` and ``dgst_monai.data_manifests`` (``dgst_monai.bundle.resources`` finds them). Automatic discovery
cannot see mapped folders and an explicit list in pyproject.toml would miss each new subpackage, hence this file.
"""

from setuptools import find_packages, setup

SHIPPED = ["dgst_monai.bundles", "dgst_monai.data_manifests"]

setup(packages=[*find_packages(include=["dgst_monai", "dgst_monai.*"]), *SHIPPED])
