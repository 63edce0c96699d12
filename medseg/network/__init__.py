"""DICOM networking: where outputs go (:mod:`.destinations`, credentials in :mod:`.credentials`), sending
files by C-STORE or STOW-RS with retries (:mod:`.send`), and pulling CT series from a DICOMweb server
(:mod:`.dicomweb`)."""
