"""The store: records and their keys, baselines, the gathered results table (records), read-ahead of stored
baselines (readahead)."""
