"""The store: the columns of a record and the table (columns), the typed and versioned record, written and read in
one place (record), keys, baselines and the gathered results table (records), read-ahead of stored baselines
(readahead)."""
