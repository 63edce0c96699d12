"""Generators for tests and demos: DICOM CT series written from a volume, with the faults real exports have
(:mod:`.dicom_series`)."""
