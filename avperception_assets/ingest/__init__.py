"""Ingest: landing batches checked and appended to the frames table; rejected inputs quarantined."""
