"""Seeded synthetic CT with lymph-node labels: the embedded default data of dgst-monai.

* :mod:`~dgst_monai.data.phantoms.synthesis`: cases and datasets (knobs, rendering, noise, NIfTI files), the
  names exported here;
* :mod:`~dgst_monai.data.phantoms.anatomy`: the neck and chest templates, HU-calibrated tissues and the
  lymph-node placer;
* :mod:`~dgst_monai.data.phantoms.shapes`: the solids the templates are built from;
* :mod:`~dgst_monai.data.phantoms.benchmark_sets`: the benchmark's synthetic sets (source, source_test and the
  mediastinal targets) from the data manifest.

Example:
    >>> from dgst_monai.data.phantoms import synthesize_case
    >>> case = synthesize_case("mediastinum", seed=3, fov_mm=(110, 110, 48), n_nodes=4)
    >>> len(case.nodes)
    4
"""

# the generator's public names, as its __all__ lists them
from dgst_monai.data.phantoms.synthesis import *  # noqa: F403
from dgst_monai.data.phantoms.synthesis import __all__
