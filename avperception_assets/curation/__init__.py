"""Curation: the computed columns of the frames table (Geneva UDF backfills), their checks and table maintenance."""
