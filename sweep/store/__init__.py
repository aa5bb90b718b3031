"""The store: records and their keys (records), the gathered results table (table), atomic files (files)."""
