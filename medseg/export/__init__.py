"""File formats that viewers and PACS read: DICOM SEG (:mod:`.dicom_seg`, checked by :mod:`.seg_check`),
3D Slicer / ITK-SNAP / per-organ files (:mod:`.viewers`), and the organ names and codes they carry
(:mod:`.names`, :mod:`.codes`)."""
