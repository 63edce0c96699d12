"""File formats that viewers and PACS read: DICOM SEG (:mod:`.dicom_seg`, checked by :mod:`.seg_check`), DICOM
RT Structure Set (:mod:`.rtstruct`, checked by the independent rasteriser :mod:`.rtstruct_check`), their
deterministic UIDs (:mod:`.uids`), 3D Slicer / ITK-SNAP / per-organ files (:mod:`.viewers`), and the organ
names and codes they carry (:mod:`.names`, :mod:`.codes`)."""
