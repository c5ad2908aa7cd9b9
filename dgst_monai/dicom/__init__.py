"""Clinical DICOM: CT series, RT Structure Sets and DICOM Segmentations in, DICOM-SEG and RTSTRUCT out.

* :mod:`~dgst_monai.dicom.series`: find CT series, structure sets and segmentations under a folder (any depth,
  any file names), with each series' voxel grid and what keeps it from being one regular volume.
* :mod:`~dgst_monai.dicom.rtstruct` / :mod:`~dgst_monai.dicom.seg`: contours and segments rasterised on a CT
  grid; a mask written back as an RT Structure Set (our own, on pydicom) or a Segmentation (highdicom).
* :mod:`~dgst_monai.dicom.labels`: lymph-node labels of ``dgst-monai data index DIR dicom --structures ...``.
* :mod:`~dgst_monai.dicom.writers`: :func:`mask_to_dicom`, behind ``data to-dicom``, ``predict --format`` and the
  bundles' ``output_format``.
"""
