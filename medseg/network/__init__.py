"""DICOM networking: where outputs go (:mod:`.destinations`, credentials in :mod:`.credentials`), sending
files by C-STORE or STOW-RS with retries (:mod:`.send`), and pulling CT series from a DICOMweb server
(:mod:`.dicomweb`). For ``medseg segment``: the pull into a hidden folder of the output (:mod:`.pull`), the
delivery of each case's DICOM outputs with a record (:mod:`.deliver`), and both options checked up front
(:mod:`.plan`)."""
