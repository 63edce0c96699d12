"""The DICOM node (``medseg node serve``): a Storage SCP that spools received CT (:mod:`.scp`, paths and UID
checks in :mod:`.spool`), a durable SQLite job store (:mod:`.store`, its rows in :mod:`.records`, the retry
schedule in :mod:`.retry`), workers that run each stable series through the batch core and send the results
on (:mod:`.worker`), and the serve loop with start-up recovery (:mod:`.service`) in a work folder
(:mod:`.workdir`)."""
