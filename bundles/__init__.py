"""The shipped MONAI bundles, installed as the package data ``dgst_monai.bundles`` (see :mod:`dgst_monai.bundle.resources`)."""
