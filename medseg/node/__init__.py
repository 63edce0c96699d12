"""The DICOM node (``medseg node serve``): a Storage SCP that spools received CT (:mod:`.scp`), a durable
SQLite job store (:mod:`.store`), and workers that run each stable series through the batch core and send
the results on (:mod:`.worker`, :mod:`.service`)."""
