"""The dataset cards, shipped as the package data ``dgst_monai.data_manifests`` (see :mod:`dgst_monai.bundle.resources`)."""
