"""Shipped MetaSchedule tuning records, one folder per target key (data only; see README.md)."""
