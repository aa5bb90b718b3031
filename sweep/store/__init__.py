"""The store: records and their keys, the gathered results table (records), atomic files (files)."""
