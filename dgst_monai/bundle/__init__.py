"""What the MONAI bundles call and what works on a bundle folder, apart from the fine-tuning core.

The bundles' configs reach these modules by ``_target_`` (``dgst_monai.bundle.checks.check_data``), as
``monai.bundle`` holds MONAI's own bundle tooling:

* :mod:`~dgst_monai.bundle.record`: the training record a run writes beside its checkpoint;
* :mod:`~dgst_monai.bundle.checks`: the checks a bundle run makes in ``initialize``, before any long work;
* :mod:`~dgst_monai.bundle.config_values`: settings typed on a ``monai.bundle run`` command line, read as what
  they say, and the one rule for setting an ``a#b`` key of a config;
* :mod:`~dgst_monai.bundle.tracking`: ``--tracking mlflow`` wiring;
* :mod:`~dgst_monai.bundle.export`: a checkpoint as a standalone model-zoo bundle (stage, verify, zip);
* :mod:`~dgst_monai.bundle.variants`: ``ln_ct_swinunetr`` generated from ``ln_ct_dynunet``, and both bundles'
  written network plan;
* :mod:`~dgst_monai.bundle.resources`: where the shipped bundles and dataset cards are.

Importing this package loads none of them; each module imports what it needs when it is used.
"""
