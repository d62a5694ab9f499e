"""Where records come from besides one LLaVA JSON file: mix files naming several sources
(`mixfile`, `mix`), Hugging Face `datasets` folders and Parquet (`arrow`, rows converted by
`rows`), WebDataset tar shards (`webdataset`), and what a record read from a source carries
that its JSON cannot forge (`record`)."""
