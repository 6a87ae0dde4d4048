"""Pure detection: message values to feature vectors, thresholds, the detector, output records.

No Kafka, no files, no clock: the service layer passes the time in and does the I/O.
"""
